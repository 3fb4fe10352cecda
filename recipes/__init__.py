"""Shipped recipes (TOML); this file makes them importable as gte.recipes."""
