"""With no max_rpm / max_tpm there is no gate, and stats() says so."""

from __future__ import annotations

from typing import Any

import pytest

from llmtrail import BaseLLMService, GenerationRequest


@pytest.fixture(autouse=True)
def no_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LLMTRAIL_MAX_RPM", "LLMTRAIL_MAX_TPM", "LLMTRAIL_RATE_LIMIT_URL"):
        monkeypatch.delenv(name, raising=False)


async def test_without_limits_there_is_no_gate_and_stats_says_so(mock_server: Any) -> None:
    async with BaseLLMService(
        "gpt-4o-mini",
        base_url=f"{mock_server.url}/v1",
        api_key="sk-local",
        store_url=None,
        max_concurrent_requests=7,
    ) as service:
        assert service.gates == (None, None)
        result = await service.execute_generation_async(GenerationRequest(user_prompt="hi"), "x")
        assert result.success
        stats = service.stats()
    assert (stats.max_rpm, stats.max_tpm, stats.max_concurrent_requests) == (None, None, 7)
    assert stats.gates.startswith("no max_rpm or max_tpm gate")
    assert "max_concurrent_requests=7" in stats.gates and "429" in stats.gates


async def test_with_one_limit_stats_names_the_gate_and_the_missing_one(mock_server: Any) -> None:
    async with BaseLLMService(
        "gpt-4o-mini",
        base_url=f"{mock_server.url}/v1",
        api_key="sk-local",
        store_url=None,
        max_rpm=500,
    ) as service:
        rpm_gate, tpm_gate = service.gates
        assert rpm_gate is not None and tpm_gate is None
        stats = service.stats()
    assert stats.max_rpm == 500 and stats.max_tpm is None
    assert stats.gates.startswith("RPM gate 500/min, no max_tpm gate")
