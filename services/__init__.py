"""Cortex services."""
