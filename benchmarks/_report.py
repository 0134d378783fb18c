"""Benchmark figures and the report: medians, paired ratios, targets, sections, tables.

Invariants:
- A figure is the median of its repetitions, never a single run and never a mean (one slow
  outlier on a shared machine must not move it).
- A ratio is the median of *paired* ratios: repetition i of a variant divided by repetition i
  of its baseline, both taken in the same round (see ``run_interleaved`` in ``_harness``).
- A figure with a target is PASS or MISS, computed here from the numbers; nothing downstream
  can soften a MISS. A bench that fails or is missing shows up as ERROR or SKIP with the reason.
- Everything a bench returns is plain data (:meth:`Section.to_dict`), because each bench runs
  in its own child process and sends its section back through a pipe.

The format a bench module returns from ``main(quick: bool) -> dict`` is ``Section.to_dict()``:
``{"key", "title", "figures": [Figure.to_dict(), ...], "notes": [str, ...]}``. A plain dict of
numbers is accepted too (each number becomes an informational figure, see :func:`as_section`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "HEADERS",
    "Figure",
    "Section",
    "Status",
    "Target",
    "as_section",
    "figure_cells",
    "median",
    "paired_ratios",
    "percentile",
    "print_section",
    "render_markdown",
]

Status = Literal["PASS", "MISS", "INFO", "SKIP", "ERROR"]


# ---------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def paired_ratios(samples: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Round-by-round ratios; rounds where the baseline is 0 or missing are left out."""
    return [s / b for s, b in zip(samples, baseline, strict=False) if b]


# ---------------------------------------------------------------- figures and sections


@dataclass(frozen=True, slots=True)
class Target:
    """A goal from an issue: ``value op threshold`` (or the ratio to the baseline)."""

    op: Literal[">=", "<=", ">", "<", "=="]
    threshold: float
    of: Literal["value", "ratio"] = "value"
    label: str = ""

    def met(self, value: float, ratio: float | None) -> bool | None:
        x = ratio if self.of == "ratio" else value
        if x is None or math.isnan(x):
            return None
        return {
            ">=": x >= self.threshold,
            "<=": x <= self.threshold,
            ">": x > self.threshold,
            "<": x < self.threshold,
            "==": x == self.threshold,
        }[self.op]

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.of == "ratio":
            return f"{self.op} {self.threshold:.0%} of baseline"
        return f"{self.op} {_number(self.threshold)}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class Figure:
    """One measured quantity: its repetitions, its baseline, its target."""

    name: str
    unit: str
    samples: list[float]
    baseline: str | None = None
    ratio_samples: list[float] = field(default_factory=list)
    target: Target | None = None
    note: str = ""
    error: str | None = None  # why there is no value (SKIP / ERROR), shown in the table

    @property
    def value(self) -> float:
        return median(self.samples)

    @property
    def ratio(self) -> float | None:
        return median(self.ratio_samples) if self.ratio_samples else None

    @property
    def status(self) -> Status:
        if self.error is not None:
            return "ERROR" if self.error.startswith("error") else "SKIP"
        if self.target is None:
            return "INFO"
        met = self.target.met(self.value, self.ratio)
        return "PASS" if met else "MISS"  # no value at all is a miss, never a pass

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "samples": list(self.samples),
            "baseline": self.baseline,
            "ratio_samples": list(self.ratio_samples),
            "target": self.target.to_dict() if self.target else None,
            "note": self.note,
            "error": self.error,
            # Derived, for readers of the dict; ignored by from_dict.
            "value": self.value,
            "ratio": self.ratio,
            "status": self.status,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Figure:
        target = data.get("target")
        samples = data.get("samples")
        if samples is None and data.get("value") is not None:
            samples = [data["value"]]
        return cls(
            name=str(data["name"]),
            unit=str(data.get("unit", "")),
            samples=[float(s) for s in samples or []],
            baseline=data.get("baseline"),
            ratio_samples=[float(r) for r in data.get("ratio_samples") or []],
            target=Target(**target) if target else None,
            note=str(data.get("note") or ""),
            error=data.get("error"),
        )


@dataclass(slots=True)
class Section:
    """The figures of one bench, in the order they are shown."""

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float | None = None

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "figures": [f.to_dict() for f in self.figures],
            "notes": list(self.notes),
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Section:
        return cls(
            key=str(data["key"]),
            title=str(data.get("title", data["key"])),
            figures=[Figure.from_dict(f) for f in data.get("figures", [])],
            notes=[str(n) for n in data.get("notes", [])],
            elapsed_s=data.get("elapsed_s"),
        )


def _replay_figures(section: Section, data: dict[str, Any]) -> None:
    """bench_replay's flat dict: the issue's "100,000 calls in <= 10 s" is 10,000 calls/s,
    which also judges a reduced (--quick) run fairly."""
    calls, total = data.pop("calls", None), data.pop("total_s", None)
    if not isinstance(calls, int | float) or not isinstance(total, int | float) or total <= 0:
        return
    section.add(
        Figure(
            f"extract + replay, {calls:,.0f} calls",
            "calls/s",
            [calls / total],
            target=Target(">=", 10_000, label=">= 10,000 (100,000 in <= 10 s)"),
            note=f"{total:.2f} s wall in total",
        )
    )
    for name in ("target_s", "meets_target"):
        data.pop(name, None)  # judged above, from the numbers


def _unit_of(key: str) -> str:
    """The unit a flat dict's key names by its suffix (``extract_s`` -> s)."""
    for suffix, unit in (("_per_s", "/s"), ("_ms", "ms"), ("_s", "s"), ("_mb", "MB")):
        if key.endswith(suffix):
            return unit
    return ""


_ADAPTERS: dict[str, Callable[[Section, dict[str, Any]], None]] = {"replay": _replay_figures}


def as_section(key: str, title: str, data: Mapping[str, Any]) -> Section:
    """A bench's return value as a Section: ``Section.to_dict()`` format, or a flat dict.

    In a flat dict each number becomes an informational figure named after its key, each
    other value a note; a nested dict is flattened with dotted keys. A known bench's flat
    dict first goes through its adapter, which turns the numbers its issue sets a target for
    into judged figures.
    """
    if isinstance(data.get("figures"), list):
        merged = {"key": key, "title": title, **data}
        return Section.from_dict(merged)
    section = Section(key, title)
    data = dict(data)
    if key in _ADAPTERS:
        _ADAPTERS[key](section, data)

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            section.notes.append(f"{prefix}: {value}")
        elif isinstance(value, int | float):
            section.add(Figure(prefix, _unit_of(prefix), [float(value)]))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, Sequence) and all(isinstance(v, int | float) for v in value):
            section.add(Figure(prefix, "", [float(v) for v in value]))
        else:
            section.notes.append(f"{prefix}: {value!r}")

    walk("", dict(data))
    return section


# ---------------------------------------------------------------- rendering


def _number(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if x == 0:
        return "0"
    magnitude = abs(x)
    if magnitude >= 1000:
        return f"{x:,.0f}"
    if magnitude >= 100:
        return f"{x:.0f}"
    if magnitude >= 10:
        return f"{x:.1f}"
    if magnitude >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def figure_cells(figure: Figure) -> list[str]:
    """Figure, median, unit, reps (min..max), vs baseline, target, status."""
    if figure.error is not None:
        return [figure.name, "", figure.unit, "", "", "", f"{figure.status}: {figure.error}"]
    spread = ""
    if len(figure.samples) > 1:
        spread = f"{len(figure.samples)} ({_number(min(figure.samples))}.."
        spread += f"{_number(max(figure.samples))})"
    elif figure.samples:
        spread = "1"
    ratio = figure.ratio
    vs = f"{ratio:.1%} of {figure.baseline}" if ratio is not None and figure.baseline else ""
    target = figure.target.describe() if figure.target else ""
    return [figure.name, _number(figure.value), figure.unit, spread, vs, target, figure.status]


HEADERS = ["figure", "median", "unit", "reps (min..max)", "vs baseline", "target", "status"]


def render_markdown(
    sections: Sequence[Section], machine: Mapping[str, str], command: str, mode: str
) -> str:
    lines = [
        "# llmtrail benchmarks",
        "",
        f"Generated by `{command}` ({mode}). Every figure is the median of its repetitions; "
        "variants ran interleaved (A B C A B C ...) and each ratio is the median of the "
        "per-round ratios to the baseline measured in the same round. A MISS is a target "
        "not met in this run.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    misses = [
        (f.status, s.title, f.name)
        for s in sections
        for f in s.figures
        if f.status in ("MISS", "ERROR")
    ]
    lines += ["", "## Summary", ""]
    targets = [f for s in sections for f in s.figures if f.target is not None]
    passed = sum(1 for f in targets if f.status == "PASS")
    lines.append(f"{passed} of {len(targets)} targets met.")
    if misses:
        lines.append("")
        lines += [f"- {status}: {title}: {name}" for status, title, name in misses]
    for section in sections:
        elapsed = f" ({section.elapsed_s:.0f} s)" if section.elapsed_s is not None else ""
        lines += ["", f"## {section.title}{elapsed}", ""]
        lines.append("| " + " | ".join(HEADERS) + " |")
        lines.append("|" + "---|" * len(HEADERS))
        for figure in section.figures:
            cells = [c.replace("|", "\\|") for c in figure_cells(figure)]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"{f.name}: {f.note}" for f in section.figures if f.note] + section.notes
        if notes:
            lines.append("")
            for note in notes:
                if "\n" in note:
                    lines += ["```", note.rstrip(), "```"]
                else:
                    lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def print_section(section: Section, console: Any) -> None:
    from rich.table import Table

    elapsed = f" ({section.elapsed_s:.0f} s)" if section.elapsed_s is not None else ""
    table = Table(title=f"{section.title}{elapsed}", title_justify="left")
    for header in HEADERS:
        table.add_column(header, justify="right" if header == "median" else "left")
    styles = {"PASS": "green", "MISS": "bold red", "ERROR": "bold red", "SKIP": "yellow"}
    for figure in section.figures:
        cells = figure_cells(figure)
        style = styles.get(figure.status, "")
        table.add_row(*cells[:-1], f"[{style}]{cells[-1]}[/]" if style else cells[-1])
    console.print(table)
    for figure in section.figures:
        if figure.note:
            console.print(f"  {figure.name}: {figure.note}", markup=False)
    for note in section.notes:
        console.print(f"  {note}", markup=False)
