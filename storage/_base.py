"""The store's error types, URL defaults and command defaults, importable without SQLAlchemy.

The CLI's parser registers the store's commands (``migrate``, ``events``, ``sql``, ``usage``,
``projections``) and catches :class:`StoreError` in them; building it must not import
SQLAlchemy (about 0.15 s), so what it needs is defined here, once, and the modules that do the
work (:mod:`._engine`, :mod:`._projections`, :mod:`._readonly`) import it from here.

Invariants:
- This module imports nothing but the standard library and ``llmtrail.pipeline._errors``.
- :func:`mask_url` never returns a password, whether given text or a SQLAlchemy ``URL``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from llmtrail.pipeline._errors import ConfigurationError, LLMTrailError
from llmtrail.pipeline._redact import mask_url_password

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_STORE_URL",
    "DEFAULT_TIMEOUT_S",
    "PROJECTIONS",
    "REBUILD_BATCH_SIZE",
    "STORE_URL_ENV",
    "StoreClosedError",
    "StoreConfigError",
    "StoreCorruptError",
    "StoreError",
    "StoreSchemaError",
    "StoreUnavailableError",
    "mask_url",
    "store_url_from_environment",
]

DEFAULT_STORE_URL: Final = "sqlite+aiosqlite:///llmtrail.db"
STORE_URL_ENV: Final = "LLMTRAIL_STORE_URL"

#: The projections, in the order they are applied.
PROJECTIONS: Final = ("calls", "usage_daily", "metrics_minute")
#: Events per batch when projections catch up with the log.
DEFAULT_BATCH_SIZE: Final = 5000
#: A rebuild replays the whole log in ranges of this many events, one transaction each: big
#: enough that per-range queries cost little, small enough that SQLite's write lock is held for
#: well under a second (about 0.3 s per 100,000 events) and memory stays bounded.
REBUILD_BATCH_SIZE: Final = 100_000

#: ``llmtrail sql``: the statement's time limit and the most rows held in memory.
DEFAULT_TIMEOUT_S: Final = 30.0
DEFAULT_MAX_ROWS: Final = 1_000_000


class StoreError(LLMTrailError):
    """Base class of the event store's errors."""


class StoreConfigError(StoreError, ConfigurationError):
    """The store URL or a store option is invalid; the message names the value and the fix."""


class StoreSchemaError(StoreError):
    """The store's schema is missing or at a revision this llmtrail does not know."""


class StoreCorruptError(StoreError):
    """The store's file is damaged or belongs to another program: retrying cannot help.

    Raised instead of being retried as an outage; the message names the file and the fix.
    """


class StoreUnavailableError(StoreError):
    """The database cannot be reached or opened right now."""


class StoreClosedError(StoreError, RuntimeError):
    """The writer or reader was used after ``aclose()``."""


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***``, safe for logs and error messages."""
    if not isinstance(url, str):
        # A SQLAlchemy URL. An unencoded "@" in the password leaves part of it in the parsed
        # host: mask the rendered text up to the authority's last "@" too.
        return mask_url_password(url.render_as_string(hide_password=True))
    # A URL that does not parse may still hold a password: mask ``scheme://user:secret@``.
    return mask_url_password(url)


def store_url_from_environment(url: str | None = None) -> str:
    """``url`` if given, else ``$LLMTRAIL_STORE_URL``, else the SQLite file ``llmtrail.db``."""
    return url or os.environ.get(STORE_URL_ENV) or DEFAULT_STORE_URL
