"""Backends beyond the reference, one module per family; each registers itself on import."""
