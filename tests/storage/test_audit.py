"""The audit surface: every query of docs/sql.md, ``llmtrail usage`` and ``llmtrail
projections``, against a populated store on both backends.

The queries are parsed out of docs/sql.md, so the documentation and this test cannot drift: a
query added to the page without a check here fails ``test_every_documented_query_is_checked``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from llmtrail.pipeline._cli import build_parser
from llmtrail.storage._projections import run_projections
from llmtrail.storage._readonly import ReadOnlyLimits, run_readonly_sql
from llmtrail.storage._usage import usage_report
from tests.storage.projection_events import CallSpec, LogStore, call_events, sample_log

DOC = Path(__file__).resolve().parents[2] / "docs" / "sql.md"
CALL_ID = "c-retry"


def main(argv: list[str]) -> int:
    """``llmtrail ARGV`` in-process, without the CLI's global logging setup (which would bind
    the log handlers to this test's captured stderr)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def documented_queries() -> list[tuple[str, str | None, str]]:
    """(name, backend or None for both, SQL) of every ```sql block with a ``-- query:`` line."""
    out = []
    for block in re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S):
        name = re.search(r"^-- query: *(\S+)", block, flags=re.M)
        if name is None:
            continue
        backend = re.search(r"^-- backend: *(\S+)", block, flags=re.M)
        out.append((name.group(1), backend.group(1) if backend else None, block))
    return out


def money(value: Any) -> Decimal | None:
    """A cost as the backend returns it (Decimal, or a float from SQLite's SUM)."""
    if value is None:
        return None
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))


def close(value: Any, expected: str) -> bool:
    found = money(value)
    return found is not None and abs(found - Decimal(expected)) < Decimal("1e-12")


Rows = list[dict[str, Any]]
C_OK_1, C_OK_2 = "0.0000405", "0.000675"


def check_spend_by_day(rows: Rows) -> None:
    assert [str(r["day"])[:10] for r in rows] == ["2025-03-01", "2025-03-02"]
    assert [r["calls"] for r in rows] == [7, 1]
    assert [r["failed"] for r in rows] == [2, 0]
    assert [r["unpriced_calls"] for r in rows] == [1, 0]
    assert close(rows[0]["cost_usd"], "0.0001215") and close(rows[1]["cost_usd"], C_OK_2)


def check_spend_by_model(rows: Rows) -> None:
    assert [r["model"] for r in rows] == ["gpt-4o", "gpt-4o-mini", "my-local-llama"]
    assert rows[2]["cost_usd"] is None  # unpriced, never $0
    assert close(rows[0]["cost_usd"], C_OK_2)


def check_spend_by_operation(rows: Rows) -> None:
    assert [(r["operation_name"], r["calls"]) for r in rows] == [("summarise", 1), ("greet", 7)]


def check_spend_by_tenant(rows: Rows) -> None:
    by_tenant = {r["tenant"]: r for r in rows}
    assert set(by_tenant) == {"acme", "globex", None}
    assert close(by_tenant["globex"]["cost_usd"], "0.0007155")
    assert close(by_tenant["acme"]["cost_usd"], "0.000081")
    assert (by_tenant["acme"]["calls"], by_tenant["acme"]["failed"]) == (4, 1)
    assert rows[0]["tenant"] == "globex"


def check_one_tenant_by_day(rows: Rows) -> None:
    assert [(str(r["day"])[:10], r["calls"]) for r in rows] == [("2025-03-01", 4)]
    assert close(rows[0]["cost_usd"], "0.000081")


def check_failed_calls(rows: Rows) -> None:
    assert {r["call_id"]: (r["error_type"], r["reason"]) for r in rows} == {
        "c-fail": ("rate_limited", "the call rate_limited"),
        "c-invalid": ("validation", "the call validation"),
    }
    assert all(re.fullmatch(r"[0-9a-f]{32}", r["trace_id"]) for r in rows)


def check_failures_by_type(rows: Rows) -> None:
    assert sorted((r["error_type"], r["calls"]) for r in rows) == [
        ("rate_limited", 1),
        ("validation", 1),
    ]


def check_interrupted_calls(rows: Rows) -> None:
    assert [(r["call_id"], r["instance"]) for r in rows] == [("c-died", "host:1")]


def check_most_expensive(rows: Rows) -> None:
    assert rows[0]["call_id"] == "c-ok-2"
    assert len(rows) == 7  # every priced call; c-unpriced has no cost to rank
    costs = [money(r["cost_usd"]) for r in rows]
    assert costs == sorted(costs, reverse=True)


def check_rate_limited_per_minute(rows: Rows) -> None:
    assert sum(r["rate_limited"] for r in rows) == 3  # c-retry once, c-fail twice
    assert all(r["requests_sent"] >= r["rate_limited"] for r in rows)


def check_rate_limited_attempts(rows: Rows) -> None:
    assert len(rows) == 3
    assert {float(r["retry_after_s"]) for r in rows} == {1.5}


def check_slow_gates(rows: Rows) -> None:
    assert [r["call_id"] for r in rows] == ["c-retry"]
    assert rows[0]["rpm_wait_s"] == 7.5


def check_slow_gate_waits(rows: Rows) -> None:
    assert [(r["call_id"], r["gate"], float(r["waited_s"])) for r in rows] == [
        ("c-retry", "rpm", 2.5)
    ] * 3
    assert {int(r["waiters_ahead"]) for r in rows} == {2}


def check_events_of_a_call(rows: Rows) -> None:
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    assert rows[0]["type"] == "trace_created" and rows[-1]["type"] == "completed"
    assert [r["type"] for r in rows].count("sent") == 3


def check_jaeger_link(rows: Rows) -> None:
    (row,) = rows
    assert re.fullmatch(r"http://localhost:16686/trace/[0-9a-f]{32}", row["jaeger"])
    assert row["outcome"] == "succeeded"


CHECKS: dict[str, Callable[[Rows], None]] = {
    "spend-by-day": check_spend_by_day,
    "spend-by-model": check_spend_by_model,
    "spend-by-operation": check_spend_by_operation,
    "spend-by-tenant": check_spend_by_tenant,
    "one-tenant-by-day": check_one_tenant_by_day,
    "failed-calls": check_failed_calls,
    "failures-by-type": check_failures_by_type,
    "interrupted-calls": check_interrupted_calls,
    "most-expensive": check_most_expensive,
    "rate-limited-per-minute": check_rate_limited_per_minute,
    "rate-limited-attempts": check_rate_limited_attempts,
    "slow-gates": check_slow_gates,
    "slow-gate-waits": check_slow_gate_waits,
    "events-of-a-call": check_events_of_a_call,
    "jaeger-link": check_jaeger_link,
}


def test_every_documented_query_is_checked_and_covers_both_backends():
    queries = documented_queries()
    names = {name for name, _, _ in queries}
    assert names == set(CHECKS)
    for name in names:
        backends = [b for n, b, _ in queries if n == name]
        assert backends == [None] or sorted(backends) == ["postgresql", "sqlite"], name


async def populate(url: str) -> None:
    store = await LogStore.open(url)
    try:
        await store.append(sample_log())
    finally:
        await store.aclose()


async def test_every_documented_query_runs_and_answers_correctly(store_url):
    await populate(store_url)
    store = await LogStore.open(store_url)
    await run_projections(store.engine)
    await store.aclose()
    backend = "sqlite" if store_url.startswith("sqlite") else "postgresql"
    ran = []
    for name, only, statement in documented_queries():
        if only not in (None, backend):
            continue
        header, rows = await run_readonly_sql(
            store_url,
            statement.replace("CALL_ID", CALL_ID),
            ReadOnlyLimits(allow_privileged_role=True),
        )
        try:
            CHECKS[name]([dict(zip(header, row, strict=True)) for row in rows])
        except AssertionError as exc:
            raise AssertionError(f"docs/sql.md query {name!r} on {backend}: {exc}") from exc
        ran.append(name)
    assert sorted(ran) == sorted(CHECKS)


# -- llmtrail usage ------------------------------------------------------------------------------


@pytest.fixture
def populated(store_url):
    asyncio.run(populate(store_url))
    return store_url


def usage(url: str, capsys: Any, *options: str) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["usage", "--store", url, "--format", "json", *options]) == 0
    return json.loads(capsys.readouterr().out)


def test_usage_runs_pending_projections_and_reports_exact_money(populated, capsys):
    rows = usage(populated, capsys, "--by", "metadata.tenant")
    by = {r["metadata.tenant"]: r for r in rows}
    assert by["acme"]["cost_usd"] == "0.000081"  # exact decimal string, not a float
    assert by["globex"]["cost_usd"] == "0.0007155"
    assert (by["globex"]["calls"], by["globex"]["interrupted"]) == (3, 1)
    assert (by["acme"]["unpriced_calls"], by["(none)"]["failed"]) == (1, 1)


def test_usage_by_model_counts_unpriced_calls_and_never_prices_them(populated, capsys):
    by = {r["model"]: r for r in usage(populated, capsys, "--by", "model")}
    assert by["my-local-llama"]["cost_usd"] is None
    assert by["my-local-llama"]["unpriced_calls"] == 1
    assert by["my-local-llama"]["input_tokens"] == 120
    assert by["gpt-4o-mini"]["cost_usd"] == "0.0001215"


def test_usage_from_usage_daily_and_from_calls_agree(populated, capsys):
    # Whole-day bounds read usage_daily; a bound inside a day reads calls. Same calls, same sums.
    daily = usage(
        populated, capsys, "--by", "day", "--since", "2025-03-01", "--until", "2025-03-03"
    )
    from_calls = usage(
        populated, capsys, "--by", "day", "--since", "2025-03-01T00:00:01", "--until", "2025-03-03"
    )
    assert daily == from_calls
    assert [r["day"] for r in daily] == ["2025-03-01", "2025-03-02"]


def test_usage_since_and_until_select_calls_by_start_time(populated, capsys):
    rows = usage(populated, capsys, "--by", "operation", "--since", "2025-03-02")
    assert [(r["operation"], r["calls"]) for r in rows] == [("summarise", 1)]
    assert usage(populated, capsys, "--until", "2025-03-01") == []


def test_usage_csv_and_table_formats(populated, capsys):
    capsys.readouterr()
    assert main(["usage", "--store", populated, "--by", "operation", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("operation,calls,succeeded,failed,cancelled,interrupted")
    assert lines[1:] == [
        "greet,7,3,2,1,1,1,480,80,160,32,0.0001215",
        "summarise,1,1,0,0,0,0,120,20,40,8,0.000675",
    ]
    assert main(["usage", "--store", populated, "--by", "operation"]) == 0
    table = capsys.readouterr().out
    assert "total" in table and "0.0007965" in table


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--by", "tenant"], "--by 'tenant' is invalid"),
        (["--by", "metadata."], "--by 'metadata.' is invalid"),
        (["--since", "yesterday"], "--since 'yesterday' is not a time"),
        (["--since", "2025-03-02", "--until", "2025-03-01"], "is not before --until"),
    ],
)
def test_usage_bad_options_are_one_line_usage_errors(populated, capsys, options, message):
    capsys.readouterr()
    assert main(["usage", "--store", populated, *options]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message in err


# -- llmtrail projections ------------------------------------------------------------------------


def status(url: str, capsys: Any) -> dict[str, dict[str, Any]]:
    capsys.readouterr()
    assert main(["projections", "status", "--store", url, "--format", "json"]) == 0
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)}


def test_projections_status_run_and_rebuild(populated, capsys):
    total = len(sample_log())
    before = status(populated, capsys)
    assert {n: (r["position"], r["lag"]) for n, r in before.items()} == {
        "calls": (0, total),
        "usage_daily": (0, total),
        "metrics_minute": (0, total),
    }
    assert main(["projections", "run", "--store", populated, "calls"]) == 0
    assert f"calls: {total} events applied" in capsys.readouterr().out
    after = status(populated, capsys)
    assert (after["calls"]["lag"], after["usage_daily"]["lag"]) == (0, total)

    assert main(["projections", "rebuild", "--store", populated]) == 0
    assert f"from {total} events" in capsys.readouterr().out
    assert all(
        r["lag"] == 0 and r["head_position"] == total for r in status(populated, capsys).values()
    )


@pytest.mark.slow
def test_projections_run_picks_up_a_late_completed(store_url, capsys):
    events = call_events(CallSpec("late"))

    async def write(part):
        store = await LogStore.open(store_url)
        await store.append(part)
        await store.aclose()

    asyncio.run(write(events[:-1]))
    assert main(["projections", "run", "--store", store_url]) == 0
    assert usage(store_url, capsys, "--by", "model")[0]["interrupted"] == 1
    asyncio.run(write(events[-1:]))
    row = usage(store_url, capsys, "--by", "model")[0]
    assert (row["interrupted"], row["succeeded"]) == (0, 1)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["projections", "run", "nope"], 2, "unknown projection 'nope'"),
        (["projections", "rebuild", "--batch-size", "0"], 2, "--batch-size 0 is invalid"),
        (["projections", "run", "--follow", "--interval", "0"], 2, "--interval 0 is invalid"),
    ],
)
def test_projections_bad_usage_is_exit_2(populated, capsys, argv, code, message):
    capsys.readouterr()
    assert main([*argv, "--store", populated]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_projections_on_a_missing_sqlite_store_is_exit_2_and_creates_nothing(tmp_path, capsys):
    path = tmp_path / "absent.db"
    assert main(["projections", "run", "--store", f"sqlite+aiosqlite:///{path}"]) == 2
    assert "no event store" in capsys.readouterr().err
    assert not path.exists()


async def test_usage_report_agrees_with_the_service_after_a_flush(store_url, mock_server_factory):
    """The service's in-memory usage figures and the projection agree once events are flushed."""
    from llmtrail.pipeline import BaseLLMService, GenerationRequest
    from llmtrail.storage._engine import create_engine

    server = await mock_server_factory(
        fault_script=["rate_limit_429", "none", "http_500", "http_500", "http_500", "none"],
        fault_429_retry_after_s=0.01,
    )
    async with BaseLLMService(
        "gpt-4o-mini",
        base_url=f"{server.url}/v1",
        api_key="sk-test-0123456789abcdef",
        store_url=store_url,
        tracing=False,
        retry_backoff_base_s=0.01,
    ) as service:
        for i in range(8):
            request = GenerationRequest(
                user_prompt=f"question {i} " * (i + 1),
                model="my-private-model" if i == 7 else None,
                metadata={"tenant": ("acme", "globex")[i % 2]},
            )
            await service.execute_generation_async(request, operation_name=("ask", "sum")[i % 2])
        await service.flush()
        live = service.stats().usage
        engine = create_engine(store_url)
        try:
            await run_projections(engine)
            report = {line.key: line for line in await usage_report(engine, by="operation")}
        finally:
            await engine.dispose()
    assert set(report) == set(live) == {"ask", "sum"}
    for name, figures in live.items():
        line = report[name]
        assert (line.calls, line.succeeded, line.failed) == (
            figures.calls,
            figures.succeeded,
            figures.failed,
        )
        for field in ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens"):
            assert getattr(line, field) == getattr(figures, field), field
        assert (line.cost_usd or Decimal(0)) == figures.cost_usd
        assert line.unpriced_calls == figures.unpriced_calls
    assert report["sum"].unpriced_calls == 1  # the my-private-model call
    assert sum(line.failed for line in report.values()) == 1  # the call given three 500s
