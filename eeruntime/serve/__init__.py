"""Serving eeruntime (see the README's "Serving" section)."""
