"""Projections: calls, usage_daily, metrics_minute and projection_checkpoints.

Every table here is derived from ``events`` and can be rebuilt by replaying it
(``llmtrail projections rebuild``); downgrading drops them and loses nothing.

Revision ID: 0002_projections
Revises: 0001_events
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002_projections"
down_revision = "0001_events"
branch_labels = None
depends_on = None

# The migration spells its types out instead of importing storage's tables, so that later
# edits to the code cannot change what this revision creates.
_TS = sa.DateTime(timezone=True)
# NUMERIC affinity on SQLite: see storage._projections.Money for how exact values are stored.
_MONEY = sa.Numeric(20, 10)
_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("call_id", sa.Text(), nullable=False),
        sa.Column("trace_id", sa.Text()),
        sa.Column("operation_name", sa.Text()),
        sa.Column("model", sa.Text()),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("error_type", sa.Text()),
        sa.Column("started_at", _TS),
        sa.Column("finished_at", _TS),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", _MONEY),
        sa.Column("priced", sa.Boolean(), nullable=False),
        sa.Column("rpm_wait_s", sa.Float(), nullable=False),
        sa.Column("tpm_wait_s", sa.Float(), nullable=False),
        sa.Column("semaphore_wait_s", sa.Float(), nullable=False),
        sa.Column("latency_s", sa.Float()),
        sa.Column("total_s", sa.Float()),
        sa.Column("metadata", _JSON),
        sa.Column("instance", sa.Text()),
        sa.Column("rate_limited", sa.Integer(), nullable=False),
        sa.Column("last_position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("call_id", name="pk_calls"),
    )
    for column in ("started_at", "trace_id", "outcome"):
        op.create_index(f"ix_calls_{column}", "calls", [column])

    op.create_table(
        "usage_daily",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("operation_name", sa.Text(), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("succeeded", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("cancelled", sa.BigInteger(), nullable=False),
        sa.Column("unpriced_calls", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", _MONEY),
        sa.PrimaryKeyConstraint("day", "model", "operation_name", name="pk_usage_daily"),
    )

    op.create_table(
        "metrics_minute",
        sa.Column("minute", _TS, nullable=False),
        sa.Column("requests_sent", sa.BigInteger(), nullable=False),
        sa.Column("responses_received", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("rate_limited", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("rpm_wait_s", sa.Float(), nullable=False),
        sa.Column("tpm_wait_s", sa.Float(), nullable=False),
        sa.Column("semaphore_wait_s", sa.Float(), nullable=False),
        sa.Column("latency_sum_s", sa.Float(), nullable=False),
        sa.Column("latency_count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("minute", name="pk_metrics_minute"),
    )

    checkpoints = op.create_table(
        "projection_checkpoints",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_projection_checkpoints"),
    )
    # Every projection starts at position 0; having the rows from the start means runners
    # only ever update them (a compare-and-set), never race to insert them.
    now = datetime.now(UTC)
    op.bulk_insert(
        checkpoints,
        [
            {"name": name, "position": 0, "updated_at": now}
            for name in ("calls", "usage_daily", "metrics_minute")
        ],
    )


def downgrade() -> None:
    op.drop_table("projection_checkpoints")
    op.drop_table("metrics_minute")
    op.drop_table("usage_daily")
    for column in ("started_at", "trace_id", "outcome"):
        op.drop_index(f"ix_calls_{column}", "calls")
    op.drop_table("calls")
