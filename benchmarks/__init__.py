"""llmtrail's benchmarks: ``python -m benchmarks [--quick] [--only NAME ...]``.

Speed is measured here, side by side with the bare openai SDK in the same run, never in the
test suite. Each bench module has ``main(quick: bool) -> dict`` (see :mod:`benchmarks._report`
for the format) and runs in its own process; the results go to ``benchmarks/RESULTS.md``.

Importing this package runs nothing.
"""

from __future__ import annotations

#: name -> (module, title), in the order they run and appear in RESULTS.md.
BENCHES: dict[str, tuple[str, str]] = {
    "overhead": ("benchmarks.bench_overhead", "1. Overhead against a zero-latency server"),
    "gates": ("benchmarks.bench_gates", "2. Gate efficiency"),
    "store": ("benchmarks.bench_store", "3. Event store and projections"),
    "write_ahead": ("benchmarks.bench_store_write_ahead", "3b. Write-ahead: cost and crash safety"),
    "replay": ("benchmarks.bench_replay", "4. Replay"),
    "scale": ("benchmarks.bench_scale", "5. Scale: 10,000 concurrent calls"),
    "scale_out": ("benchmarks.bench_scale_out", "6. Scale out"),
    "startup": ("benchmarks.bench_startup", "7. Start-up and import time"),
    "stream": ("benchmarks.bench_stream", "8. Streamed calls"),
    # Micro-benchmarks of one component, for its engineer: run with --only NAME or --all.
    "tracing_sink": ("benchmarks.bench_tracing_sink", "Extra: tracing sink cost per call"),
    "store_writer": ("benchmarks.bench_store_writer", "Extra: event writer in detail"),
}

#: What runs without --only / --all: the figures the issues ask for.
DEFAULT_BENCHES = (
    "overhead",
    "gates",
    "store",
    "write_ahead",
    "replay",
    "scale",
    "scale_out",
    "startup",
    "stream",
)

__all__ = ["BENCHES", "DEFAULT_BENCHES"]
