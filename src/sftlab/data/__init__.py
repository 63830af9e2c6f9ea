"""Data: read files, map columns, validate rows, tokenize, batch."""
