"""Alembic migrations of the event store: the only place the schema is created.

Run them with ``llmtrail migrate`` (or :func:`storage.migrate`); a service runs them on its own
when it opens a store that has no schema yet. ``alembic -c migrations/alembic.ini ...`` also
works, with the store URL taken from ``$LLMTRAIL_STORE_URL``.
"""
