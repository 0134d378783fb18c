"""Usage from the projections: calls, outcomes, tokens and exact spend, grouped.

Invariants:
- Reads the projections as they are; callers bring them up to date first (``llmtrail usage``
  does).
- Whole-day bounds (or none) are answered from ``usage_daily``; other bounds and metadata keys
  from ``calls``. Both give the same figures for the same calls.
- Money is summed as ``Decimal`` in Python, never as a float in SQL. ``cost_usd`` is ``None``
  for a group whose calls are all unpriced, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as dtime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from ._cli import UsageError
from ._folds import USAGE_COLUMNS, UsageRow
from ._projections import calls, usage_daily

__all__ = ["COUNTERS", "UsageLine", "check_by", "usage_report"]

_BY_FIXED = ("day", "model", "operation")


@dataclass(slots=True)
class UsageLine(UsageRow):
    """One group of ``llmtrail usage``: a :class:`UsageRow` with its key. ``cost_usd`` is the
    exact sum over the priced calls (``None`` when every call in the group is unpriced)."""

    key: str = ""

    @property
    def interrupted(self) -> int:
        """Calls started but not completed: still running, or their process died."""
        return self.calls - self.succeeded - self.failed - self.cancelled

    def as_dict(self) -> dict[str, Any]:
        return {**UsageRow.as_dict(self), "interrupted": self.interrupted}


COUNTERS = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")


def check_by(by: str) -> None:
    if by not in _BY_FIXED and not (by.startswith("metadata.") and len(by) > len("metadata.")):
        raise UsageError(
            f"--by {by!r} is invalid: use day, model, operation or metadata.KEY "
            "(e.g. metadata.tenant)"
        )


def _midnight(value: datetime | None) -> bool:
    return value is None or value.timetz().replace(tzinfo=None) == dtime(0)


async def usage_report(
    engine: AsyncEngine,
    by: str = "day",
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[UsageLine]:
    """Usage grouped by ``day``, ``model``, ``operation`` or ``metadata.KEY``, over calls that
    started in ``[since, until)``. Reads the projections as they are: run them first.

    Whole-day bounds (or none) are answered from ``usage_daily``; other bounds and metadata
    keys from ``calls``. Both give the same figures for the same calls.
    """
    check_by(by)
    lines: dict[str, UsageLine] = {}

    def line(key: str) -> UsageLine:
        found = lines.get(key)
        if found is None:
            found = lines[key] = UsageLine(key=key)
        return found

    async with engine.connect() as conn:
        if by in _BY_FIXED and _midnight(since) and _midnight(until):
            query = select(usage_daily)
            if since is not None:
                query = query.where(usage_daily.c.day >= since.date())
            if until is not None:
                query = query.where(usage_daily.c.day < until.date())
            column = {"day": "day", "model": "model", "operation": "operation_name"}[by]
            for row in (await conn.execute(query)).mappings():
                line(str(row[column])).add(UsageRow(**{c: row[c] for c in USAGE_COLUMNS}))
        else:
            key_name = by.removeprefix("metadata.") if by.startswith("metadata.") else None
            columns = [
                calls.c.started_at,
                calls.c.model,
                calls.c.operation_name,
                calls.c.outcome,
                calls.c.priced,
                calls.c.cost_usd,
                *(calls.c[name] for name in COUNTERS),
            ]
            if key_name is not None:
                columns.append(calls.c.metadata)
            query = select(*columns)
            if since is not None:
                query = query.where(calls.c.started_at >= since)
            if until is not None:
                query = query.where(calls.c.started_at < until)
            result = await conn.stream(query)
            async for row in result.mappings():
                if key_name is not None:
                    value = (row["metadata"] or {}).get(key_name)
                    key = "(none)" if value is None else str(value)
                elif by == "day":
                    started = row["started_at"]
                    key = started.astimezone(UTC).date().isoformat() if started else "(none)"
                elif by == "model":
                    key = row["model"] or ""
                else:
                    key = row["operation_name"] or ""
                outcome = row["outcome"]
                line(key).add(
                    UsageRow(
                        calls=1,
                        succeeded=int(outcome == "succeeded"),
                        failed=int(outcome == "failed"),
                        cancelled=int(outcome == "cancelled"),
                        unpriced_calls=int(not row["priced"]),
                        cost_usd=row["cost_usd"],
                        **{name: row[name] for name in COUNTERS},
                    )
                )
    return [lines[key] for key in sorted(lines)]
