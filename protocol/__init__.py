"""Cortex protocol."""
