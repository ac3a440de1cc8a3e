"""Chaos runs against the real service as a subprocess (`nox -s chaos`); not pytest tests."""
