"""Property: applying the log incrementally, in any batches, with crashes between them, gives
exactly the rows of a full rebuild; running again changes nothing."""

from __future__ import annotations

import asyncio
import random
import shutil
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmtrail.storage._projections as projections_module
from llmtrail.storage._projections import PROJECTIONS, rebuild, run_projections
from tests.storage.projection_events import (
    T0,
    CallSpec,
    LogStore,
    call_events,
    interleave,
    snapshot,
)
from tests.storage.test_projections import expected_rows

ERRORS = ("rate_limited", "server_error", "timeout", "connection")

waits = st.floats(min_value=0, max_value=90, allow_nan=False, allow_infinity=False)

call_specs = st.builds(
    CallSpec,
    call_id=st.just(""),  # numbered below, so ids are unique
    start=st.integers(0, 3 * 3600).map(lambda s: T0 + timedelta(seconds=s)),
    model=st.sampled_from(["gpt-4o-mini", "gpt-4o", "my-local-llama"]),
    operation=st.sampled_from(["greet", "summarise"]),
    metadata=st.sampled_from([{}, {"tenant": "acme"}, {"tenant": "globex"}]),
    failures=st.lists(st.sampled_from(ERRORS), max_size=3),
    outcome=st.sampled_from(["succeeded", "failed", "cancelled", "validation"]),
    final_error=st.sampled_from(ERRORS),
    complete=st.booleans(),
    cut=st.none() | st.integers(1, 12),
    input_tokens=st.integers(0, 5000),
    cached_tokens=st.integers(0, 1000),
    output_tokens=st.integers(0, 2000),
    reasoning_tokens=st.integers(0, 500),
    rpm_wait_s=waits,
    tpm_wait_s=waits,
    semaphore_wait_s=waits,
    latency_s=st.floats(min_value=0.001, max_value=30, allow_nan=False),
    step_s=st.floats(min_value=0, max_value=70, allow_nan=False),
)


def make_log(specs, seed):
    streams = []
    for i, spec in enumerate(specs):
        spec.call_id = f"call-{i}"
        streams.append(call_events(spec))
    return interleave(streams, random.Random(seed))


# A step of the schedule: append this many events, then run with this batch size, and maybe
# crash inside that run (its transaction is rolled back) before running it again.
steps = st.lists(
    st.tuples(st.integers(1, 25), st.integers(1, 12), st.booleans()), min_size=1, max_size=8
)


class Crash(Exception):
    pass


@contextmanager
def crash_after_writes():
    """Make the last projection of a batch fail after the others wrote their rows."""
    real = projections_module.APPLY["metrics_minute"]

    async def failing(conn, batch, prices):
        await real(conn, batch, prices)
        raise Crash("crash mid-batch")

    projections_module.APPLY["metrics_minute"] = failing
    try:
        yield
    finally:
        projections_module.APPLY["metrics_minute"] = real


async def play(url, log, schedule, rebuild_batch):
    store = await LogStore.open(url)
    engine = store.engine
    try:
        cursor = 0
        for count, batch_size, crash in schedule:
            appended = log[cursor : cursor + count]
            await store.append(appended)
            cursor += count
            if crash and appended:
                with crash_after_writes(), pytest.raises(Crash):
                    await run_projections(engine, batch_size=batch_size)
            await run_projections(engine, batch_size=batch_size)
        await store.append(log[cursor:])
        await run_projections(engine, batch_size=schedule[-1][1])
        incremental = await snapshot(engine)

        assert await run_projections(engine) == dict.fromkeys(PROJECTIONS, 0)
        assert await snapshot(engine) == incremental

        await rebuild(engine, batch_size=rebuild_batch)
        rebuilt = await snapshot(engine)
        await rebuild(engine, batch_size=rebuild_batch + 3)
        return incremental, rebuilt, await snapshot(engine)
    finally:
        await store.aclose()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One migrated SQLite store, copied for every example (migrating is the slow part)."""
    path = tmp_path_factory.mktemp("template") / "llmtrail.db"
    engine_url = f"sqlite+aiosqlite:///{path}"

    async def make():
        store = await LogStore.open(engine_url)
        await store.aclose()

    asyncio.run(make())
    return path


@pytest.mark.slow
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=st.lists(call_specs, min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    schedule=steps,
    rebuild_batch=st.integers(1, 50),
)
def test_incremental_batches_with_crashes_equal_a_full_rebuild(
    template, tmp_path_factory, specs, seed, schedule, rebuild_batch
):
    log = make_log(specs, seed)
    path = Path(tmp_path_factory.mktemp("example")) / "llmtrail.db"
    shutil.copy(template, path)
    incremental, rebuilt, rebuilt_again = asyncio.run(
        play(f"sqlite+aiosqlite:///{path}", log, schedule, rebuild_batch)
    )
    assert incremental == rebuilt
    assert rebuilt_again == rebuilt
    assert incremental == expected_rows(log)


@pytest.mark.slow
async def test_fixed_schedule_with_crashes_equals_a_rebuild_on_postgresql(pg_url):
    specs = [
        CallSpec("a", failures=("rate_limited", "timeout"), rpm_wait_s=0.1, tpm_wait_s=0.2),
        CallSpec("b", outcome="failed", failures=("server_error",), semaphore_wait_s=1 / 3),
        CallSpec("c", outcome="cancelled", model="gpt-4o", metadata={"tenant": "acme"}),
        CallSpec("d", complete=False, cut=5, start=T0 + timedelta(hours=1)),
        CallSpec("e", outcome="validation", model="my-local-llama"),
        CallSpec("f", start=T0 + timedelta(seconds=95), latency_s=0.7, step_s=61),
    ]
    log = interleave([call_events(s) for s in specs], random.Random(11))
    schedule = [(7, 2, False), (9, 3, True), (1, 1, True), (13, 5, False)]
    incremental, rebuilt, rebuilt_again = await play(pg_url, log, schedule, 4)
    assert incremental == rebuilt == rebuilt_again == expected_rows(log)
