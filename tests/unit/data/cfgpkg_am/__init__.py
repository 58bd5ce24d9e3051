"""A tiny package holding a run config, for the pkg:// tests."""
