"""Capacity analysis by replay: recorded traffic re-run on a virtual clock.

:func:`replay` runs one :class:`~storage._replay_sim.Simulation` (the production gates and
semaphore on a virtual-time loop: see that module for what is replayed, and how) and computes
its :class:`~storage._replay_figures.Figures`; :func:`sweep` runs one per combination of knobs
(or tier); :mod:`storage._replay_plan` picks the recommendation among them.

What is replayed:
- **Errors and retries.** ``recorded``: each call's attempts as they happened (up to
  ``max_attempts``). ``modelled`` (automatic when the provider model is on or a retry knob
  differs from the recording): each attempt drawn from the provider model and the recorded
  error shares, retried by the production :class:`~pipeline.RetryPolicy`.
- **The provider's limit** (``provider_rpm``/``provider_tpm``): off unless given, or turned on
  by :func:`~storage._replay_model.provider_defaults` when the client gate is looser than the
  limit the provider stated in the recording.
- **Client time.** ``client_cpu_s=None`` replays recorded latencies (provider + client time as
  recorded); a number replays the provider's own time plus that much client CPU per attempt,
  queued on one event loop (:func:`~storage._replay_model.calibrated_client_cpu` estimates it).
- **Traffic scale k.** ``compress``: the same calls, arrival times divided by k (k x the rate,
  1/k the span). ``resample`` (seeded): round(k x N) calls over the same span; each new call
  draws u ~ U(0, 1), arrives at the linearly interpolated empirical arrival quantile u (so the
  rate profile over the span is kept, times k) and replays the recorded call nearest that
  quantile (so what kind of call arrives when is kept too).

Invariants:
- Nothing sleeps for real; a replay is deterministic given the workload and the settings.
- A replay whose calls end up waiting for each other raises :class:`ReplayStalledError` saying
  who holds what, because the production pipeline would hang the same way.
- ``queue length`` counts calls waiting at a gate or for the semaphore: from arrival to the
  send of attempt 1, plus the RPM waits of retries. Recorded and simulated figures are computed
  by the same function, so they compare like for like.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from llmtrail.pipeline import (
    LLMTrailError,
    PriceTable,
    VirtualTimeLoop,
)

from ._folds import paused_gc
from ._replay_figures import Figures, Run, figures
from ._replay_model import ReplaySettings, scaled_calls
from ._replay_sim import Simulation
from ._workload import Workload

__all__ = ["Replay", "ReplayStalledError", "replay", "replay_async"]


class ReplayStalledError(LLMTrailError, RuntimeError):
    """Under these settings the calls end up waiting for each other and the replay cannot
    finish: the production pipeline would hang the same way. The message says who holds
    what."""


@dataclass(slots=True)
class Replay:
    settings: ReplaySettings
    run: Run
    figures: Figures


def replay(
    workload: Workload,
    settings: ReplaySettings | None = None,
    *,
    prices: PriceTable | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Replay:
    """Re-run ``workload`` under ``settings`` (default: as recorded) on virtual time.

    This runs its own event loop, so it cannot be called from async code: there, use
    :func:`replay_async` (the same, in a worker thread).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "replay() runs its own virtual-time event loop and cannot run inside another: "
            "use `await replay_async(...)` in async code"
        )
    settings = settings or ReplaySettings.recorded(workload)
    with paused_gc():
        return _replay(workload, settings, prices, on_progress)


def _replay(
    workload: Workload,
    settings: ReplaySettings,
    prices: PriceTable | None,
    on_progress: Callable[[int, int], None] | None,
) -> Replay:
    loop = VirtualTimeLoop()
    sim = Simulation(scaled_calls(workload, settings), settings, workload, loop)
    sim.on_progress = on_progress
    try:
        try:
            run: Run = loop.run_until_complete(sim.main())
        except RuntimeError as exc:
            if sim.left == 0:
                raise
            # The loop found nothing scheduled and nothing ready with calls unfinished: they
            # wait for each other. Describe it, then cancel them so that nothing leaks.
            report = loop.run_until_complete(sim.stall_report())
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(RuntimeError):
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            raise ReplayStalledError(report) from exc
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return Replay(settings, run, figures(run, prices))


async def replay_async(
    workload: Workload,
    settings: ReplaySettings | None = None,
    *,
    prices: PriceTable | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Replay:
    """:func:`replay` for async code: it runs in a worker thread, off the caller's loop."""
    return await asyncio.to_thread(
        replay, workload, settings, prices=prices, on_progress=on_progress
    )
