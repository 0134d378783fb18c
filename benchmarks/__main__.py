"""``python -m benchmarks [--quick] [--only NAME ...] [--output PATH]``.

Runs each bench in its own process, prints its table as soon as it ends, and writes every
figure with the machine's description to RESULTS.md (``benchmarks/RESULTS.md`` by default).
Exit code 0 when the run completed, even with misses (a miss is a finding, reported in the
file), 1 when a bench raised or timed out, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import BENCHES, DEFAULT_BENCHES
from ._harness import machine_info, run_bench_in_child
from ._report import Section, print_section, render_markdown

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="llmtrail side by side with the bare openai SDK; writes RESULTS.md.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer calls and 3 repetitions (about 1-2 min)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BENCHES),
        metavar="NAME",
        help=f"run only these benches ({', '.join(BENCHES)})",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="also run the extra micro-benchmarks ("
        + ", ".join(n for n in BENCHES if n not in DEFAULT_BENCHES)
        + ")",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="where to write the results (default benchmarks/RESULTS.md)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds before a bench is stopped (default 300 with --quick, 1800 otherwise)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = _parser().parse_args(argv)
    # Wide enough for the tables when the output is a file or a pipe (rich defaults to 80).
    console = Console() if sys.stdout.isatty() else Console(width=150)
    if args.only:
        names = [name for name in BENCHES if name in args.only]
    else:
        names = [name for name in BENCHES if args.all or name in DEFAULT_BENCHES]
    timeout = args.timeout or (300.0 if args.quick else 1800.0)
    mode = "quick: 3 repetitions, reduced counts" if args.quick else "full"
    machine = machine_info()
    console.print(
        f"[bold]llmtrail benchmarks[/] ({mode}) on {machine['cores']}, {machine['memory']}, "
        f"load {machine['load average at start']}"
    )
    sections: list[Section] = []
    started = time.perf_counter()
    for name in names:
        module, title = BENCHES[name]
        with console.status(f"running {name} ..."):
            section = run_bench_in_child(module, name, title, args.quick, timeout)
        print_section(section, console)
        sections.append(section)
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    if args.only:
        command += " --only " + " ".join(args.only)
    elif args.all:
        command += " --all"
    machine["total run time"] = f"{time.perf_counter() - started:.0f} s"
    # Other work on a shared machine moves every figure; the load says how much there was.
    machine["load average at end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render_markdown(sections, machine, command, mode))
    console.print(f"results written to {args.output}")
    failed = any(f.status == "ERROR" for s in sections for f in s.figures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
