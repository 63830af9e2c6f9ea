"""Demo sentiment dataset bundled for the quickstart (written for sftlab, 240 train / 80 dev)."""
