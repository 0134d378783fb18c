"""Alembic revisions, oldest first: ``0001_events`` and the revisions that build on it."""
