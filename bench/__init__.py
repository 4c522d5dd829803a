"""Command-line benchmark harness: `python -m bench`."""
