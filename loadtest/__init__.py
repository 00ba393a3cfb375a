"""Cortex loadtest."""
