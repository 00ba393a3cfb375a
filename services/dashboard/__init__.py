"""The web dashboard: the whole suite on a page, live (see process.py)."""
