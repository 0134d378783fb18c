"""Replay planning: sweeps, the recommendation, tiers and the ``llmtrail replay`` command line.

Expected choices are derived by hand from the gates' documented rules, as in test_replay.py.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import pytest

from llmtrail.pipeline import ConfigurationError
from llmtrail.pipeline._cli import main as cli_main
from llmtrail.storage._replay_model import ReplaySettings
from llmtrail.storage._replay_plan import Tier, parse_tier, recommend, sweep

from .replay_recording import Recording, burst, write

# -- sweeps ---------------------------------------------------------------------------------


def test_sweep_replays_every_combination_and_names_the_cheapest_meeting_the_target() -> None:
    workload = burst(12, latency=1.0)
    base = ReplaySettings.recorded(workload, window_s=1.0)
    rows = sweep(workload, base, [("max_concurrent", [2, 4, 12]), ("max_rpm", [360, 720])])
    assert [tuple(r.knobs.values()) for r in rows] == [
        (2, 360),
        (2, 720),
        (4, 360),
        (4, 720),
        (12, 360),
        (12, 720),
    ]
    p95 = {
        tuple(r.knobs.values()): r.replay.figures.total_latency_s["p95"]
        for r in rows
        if r.replay is not None
    }
    assert p95[(2, 360)] > p95[(4, 360)] > p95[(12, 720)]
    # 12 permits, 6 slots per 1 s window: two waves, the second sent a window after the
    # first's answers: p95 = 3 s. Four permits and 12 slots: three waves of 1 s, p95 = 3 s.
    # Twelve permits and 12 slots: all at once, 1 s.
    assert p95[(12, 360)] == pytest.approx(3.0, abs=0.01)
    assert p95[(4, 720)] == pytest.approx(3.0, abs=0.01)
    assert p95[(12, 720)] == pytest.approx(1.0, abs=0.01)
    chosen = recommend(rows, target_p95_s=3.01)
    assert chosen.row is not None
    # The first knob is the most significant: the fewest permits that make it, then the
    # lowest RPM among those.
    assert chosen.row.knobs == {"max_concurrent": 4, "max_rpm": 720}
    assert chosen.line.startswith("RECOMMENDED: max_concurrent=4, max_rpm=720")
    assert "next cheaper, max_concurrent=4, max_rpm=360" in chosen.evidence[1]
    assert "p95 " in chosen.evidence[1] and "> target 3.01 s" in chosen.evidence[1]
    nothing = recommend(rows, target_p95_s=0.5)
    assert nothing.row is None and nothing.line.startswith("NO RECOMMENDATION")


def test_the_recommendation_never_picks_a_setting_under_which_calls_fail() -> None:
    # The case: with the provider enforcing 2 per second, loosening the gate makes
    # calls fast *because they fail*. The fast failing settings must not be recommended.
    stated = {"x-ratelimit-limit-requests": "120", "x-ratelimit-reset-requests": "1s"}
    rec = Recording(max_rpm=120, window_s=1.0)
    for i in range(12):
        rec.call(i * 0.05, [{"latency": 0.5, "headers": stated}])
    workload = rec.workload()
    base = ReplaySettings.recorded(workload, max_attempts=1)
    rows = sweep(workload, base, [("max_rpm", [120, 600, None])])
    by_rpm = {r.knobs["max_rpm"]: r.replay.figures for r in rows}  # type: ignore[union-attr]
    assert by_rpm[600].failed > 0 and by_rpm[None].failed > 0  # the provider refuses them
    assert by_rpm[120].failed == 0
    assert by_rpm[None].total_latency_s["p95"] < by_rpm[120].total_latency_s["p95"]
    chosen = recommend(rows, target_p95_s=60.0)
    assert chosen.row is not None and chosen.row.knobs == {"max_rpm": 120}
    # A TPM limit no call fits under fails every call (too large): never recommended either.
    tiny = sweep(workload, base, [("max_tpm", [600, 200_000])])
    assert tiny[0].replay is not None and tiny[0].replay.figures.failures_by_type == {
        "too_large": 12
    }
    assert recommend(tiny, target_p95_s=60.0).row is tiny[1]
    # Tolerating failures is a choice the planner makes explicitly.
    tolerant = recommend(rows, max_failure_rate=1.0, target_p95_s=60.0)
    assert tolerant.row is not None and tolerant.row.knobs == {"max_rpm": 120}  # cheapest
    assert all("provider model ON" in r.notes[0] for r in rows if r.knobs["max_rpm"] != 120)


def test_tiers_are_replayed_with_their_limits_and_ranked_by_price() -> None:
    workload = burst(12, latency=1.0, window_s=1.0)
    tiers = [parse_tier("big=1200,1000000,900"), parse_tier("small=120,1000000,100")]
    assert tiers[1] == Tier("small", 120, 1_000_000, Decimal(100))
    assert tiers[0].usd_per_hour == Decimal(900) / 730
    rows = sweep(workload, ReplaySettings.recorded(workload, window_s=1.0), [], tiers=tiers)
    assert [r.knobs for r in rows] == [{"tier": "big"}, {"tier": "small"}]
    for row in rows:  # the gates follow the tier, so nothing fails: it queues instead
        assert row.replay is not None and row.replay.figures.failed == 0
        assert row.replay.settings.provider_rpm == row.tier.rpm == row.replay.settings.max_rpm  # type: ignore[union-attr]
    cheap = recommend(rows)
    assert cheap.row is not None and cheap.row.knobs == {"tier": "small"}
    fast = recommend(rows, target_p95_s=2.0)
    assert fast.row is not None and fast.row.knobs == {"tier": "big"}
    assert "next cheaper, tier=small, does not qualify: p95" in fast.evidence[1]
    with pytest.raises(ConfigurationError, match="NAME=rpm,tpm,usd_per_month"):
        parse_tier("small=120,1000")


# -- the command line -----------------------------------------------------------------------


@pytest.fixture
def recorded_store(sqlite_url: str) -> str:
    rec = Recording(max_rpm=600, window_s=1.0, max_concurrent_requests=4)
    for i in range(30):
        rec.call(i * 0.05, [{"latency": 0.5 + (i % 3) * 0.1}])
    asyncio.run(write(sqlite_url, rec.events))
    return sqlite_url


def test_cli_json_report_compares_recorded_and_simulated(
    recorded_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["replay", "--store", recorded_store, "--max-concurrent", "2", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    assert doc["workload"]["calls"] == 30
    assert doc["workload"]["recorded_settings"]["max_rpm"] == 600
    assert doc["settings"]["max_concurrent_requests"] == 2
    assert doc["settings"]["max_rpm"] == 600  # unchanged knobs keep the recorded value
    assert doc["simulated"]["makespan_s"] > doc["recorded"]["makespan_s"]
    for key in ("p50", "p95", "p99"):
        assert doc["simulated"]["total_latency_s"][key] > 0
        assert key in doc["simulated"]["queue_delay_s"]
    assert set(doc["simulated"]["gate_wait_s"]) == {"rpm", "tpm", "semaphore"}
    assert doc["simulated"]["peak_queue"] > 0
    assert Decimal(doc["simulated"]["cost_usd"]) > 0


def test_cli_sweep_with_target_names_the_cheapest_and_draws_a_png(
    recorded_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "replay.png"
    argv = ["replay", "--store", recorded_store, "--json", "--plot", str(png)]
    argv += ["--sweep", "max_concurrent=1,4,30", "--sweep", "max_rpm=600,1800"]
    code = cli_main([*argv, "--target-p95", "2.5"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert len(doc["rows"]) == 6
    assert doc["cheapest_order"] == ["max_concurrent", "max_rpm"]
    chosen = doc["recommendation"]["knobs"]
    assert chosen is not None
    meeting = [r for r in doc["rows"] if r["total_latency_s"]["p95"] <= 2.5 and r["failed"] == 0]
    assert chosen == min(
        (r["knobs"] for r in meeting), key=lambda k: (k["max_concurrent"], k["max_rpm"])
    )
    assert doc["recommendation"]["line"].startswith("RECOMMENDED: ")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_cli_tiers_recommend_the_cheapest_tier_that_qualifies_with_one_line(
    recorded_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiers = tmp_path / "tiers.txt"
    tiers.write_text(
        "# name=rpm,tpm,usd per month\nsmall=120,10000000,50\nmedium=600,10000000,200\n"
    )
    png = tmp_path / "tiers.png"
    argv = ["replay", "--store", recorded_store, "--tier-file", str(tiers)]
    argv += ["--tier", "large=6000,10000000,900", "--target-p95", "2", "--plot", str(png)]
    code = cli_main([*argv, "--max-concurrent", "30"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("RECOMMENDED: ")]
    # 30 calls in 1.5 s, answered in 0.5-0.7 s, each RPM slot held until a 1 s window after
    # its answer: 10 slots (medium) take three waves of ~1.6 s, 100 slots (large) one.
    assert lines == [
        "RECOMMENDED: tier=large (the cheapest by tier price, then knob values with failure "
        "rate <= 0.0% and p95 <= 2 s)"
    ]
    assert "next cheaper, tier=medium, does not qualify: p95" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_retry_and_client_knobs_and_a_failure_budget(
    recorded_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["replay", "--store", recorded_store, "--json", "--max-attempts", "1"]
    argv += ["--backoff", "0.25", "--client-cpu", "auto", "--max-failure-rate", "5%"]
    assert cli_main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    settings = doc["settings"]
    assert (settings["max_attempts"], settings["backoff_base_s"]) == (1, 0.25)
    # The recording has no provider time: it says so, and replays recorded latencies.
    assert settings["client_cpu_s"] is None
    assert any("no provider time" in note for note in doc["notes"])
    assert doc["recommendation"]["line"].startswith("RECOMMENDED: ")
    assert doc["simulated"]["failure_rate"] == 0.0


def test_cli_gate_off_turns_the_provider_model_on_from_the_stated_limits(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stated = {"x-ratelimit-limit-requests": "120", "x-ratelimit-reset-requests": "0.97s"}
    rec = Recording(max_rpm=120, window_s=1.0)
    for i in range(10):
        rec.call(i * 0.5, [{"latency": 0.3, "headers": stated}])
    asyncio.run(write(sqlite_url, rec.events))
    code = cli_main(["replay", "--store", sqlite_url, "--max-rpm", "none", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert doc["workload"]["provider_stated_limits"] == {"rpm": 120, "tpm": None, "window_s": 1.0}
    assert (doc["settings"]["provider_rpm"], doc["settings"]["provider_window_s"]) == (120, 1.0)
    assert any(note.startswith("provider model ON") for note in doc["notes"])


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--tier", "small=120,1000", "NAME=rpm,tpm,usd_per_month"),
        ("--max-failure-rate", "150%", "within 0 and 1"),
        ("--client-cpu", "fast", "use seconds, 'auto' or 'off'"),
    ],
)
def test_cli_bad_planning_options_are_usage_errors(
    recorded_store: str, capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["replay", "--store", recorded_store, option, value])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_table_output(recorded_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["replay", "--store", recorded_store, "--scale", "2"]) == 0
    out = capsys.readouterr().out
    assert "recorded" in out and "simulated" in out
    assert "latency p50 / p95 / p99" in out
    assert "scale=2" in out


def test_cli_unmet_target_exits_1(recorded_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["replay", "--store", recorded_store, "--target-p95", "0.01", "--json"])
    assert code == 1
    recommendation = json.loads(capsys.readouterr().out)["recommendation"]
    assert recommendation["knobs"] is None
    assert "> target 0.01 s" in recommendation["evidence"][0]


def test_cli_empty_range_is_one_line_with_the_fix(
    recorded_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["replay", "--store", recorded_store, "--since", "2030-01-01T00:00:00"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "widen --since/--until" in err


def test_cli_bad_sweep_is_usage_error(
    recorded_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["replay", "--store", recorded_store, "--sweep", "max_rps=1,2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "is not a knob" in err and "max_rpm" in err


def test_cli_missing_store_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'nothing.db'}"
    code = cli_main(["replay", "--store", url])
    err = capsys.readouterr().err
    assert code in (1, 2)
    assert "Traceback" not in err and err.startswith("llmtrail replay: error:")
