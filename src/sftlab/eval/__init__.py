"""Metrics and inference over encoded data."""
