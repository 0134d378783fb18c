"""Prices: one versioned table, exact Decimal arithmetic, overridable by the user.

Invariants:
- Money is ``Decimal``, computed per call from token counts; nothing is rounded on the way.
- ``cached_tokens`` are part of ``input_tokens`` and billed at the cached rate;
  ``reasoning_tokens`` are part of ``output_tokens`` and billed as output.
- A model with no price gives ``None`` ("unpriced"), never ``Decimal(0)``.
- A dated snapshot name (``gpt-4o-mini-2024-07-18``) falls back to its base model's price.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from ._errors import ConfigurationError
from ._provider_types import ProviderResponse

__all__ = ["DEFAULT_PRICES", "ModelPrice", "PriceTable"]

_MILLION = Decimal(1_000_000)
_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per one million tokens."""

    input: Decimal
    cached_input: Decimal
    output: Decimal


def _p(inp: str, cached: str, out: str) -> ModelPrice:
    return ModelPrice(Decimal(inp), Decimal(cached), Decimal(out))


# Standard-tier list prices, USD per 1M tokens. Bump PRICES_VERSION when editing.
PRICES_VERSION = "2025-08-openai-standard"
DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "gpt-4o": _p("2.50", "1.25", "10.00"),
    "gpt-4o-mini": _p("0.15", "0.075", "0.60"),
    "gpt-4.1": _p("2.00", "0.50", "8.00"),
    "gpt-4.1-mini": _p("0.40", "0.10", "1.60"),
    "gpt-4.1-nano": _p("0.10", "0.025", "0.40"),
    "o3": _p("2.00", "0.50", "8.00"),
    "o4-mini": _p("1.10", "0.275", "4.40"),
    "gpt-5": _p("1.25", "0.125", "10.00"),
    "gpt-5-mini": _p("0.25", "0.025", "2.00"),
    "gpt-5-nano": _p("0.05", "0.005", "0.40"),
}


class PriceTable:
    """Looks up a model's price and computes the exact cost of a call."""

    def __init__(
        self, prices: Mapping[str, ModelPrice] | None = None, *, version: str = PRICES_VERSION
    ) -> None:
        self._prices = dict(DEFAULT_PRICES if prices is None else prices)
        self.version = version

    @classmethod
    def default(cls) -> PriceTable:
        """The built-in table, with ``LLMTRAIL_PRICES_FILE`` (a JSON file) applied on top."""
        table = cls()
        path = os.environ.get("LLMTRAIL_PRICES_FILE")
        if path:
            table = table.with_overrides_from_file(path)
        return table

    def with_overrides(
        self,
        overrides: Mapping[str, ModelPrice | Mapping[str, str | float]],
        *,
        version: str | None = None,
    ) -> PriceTable:
        prices = dict(self._prices)
        for model, price in overrides.items():
            prices[model] = price if isinstance(price, ModelPrice) else _parse_price(model, price)
        return PriceTable(prices, version=version or f"{self.version}+overrides")

    def with_overrides_from_file(self, path: str | os.PathLike[str]) -> PriceTable:
        """JSON: ``{"version": "...", "models": {"name": {"input": "...", "cached_input": "...",
        "output": "..."}}}`` in USD per 1M tokens."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot read the price file {str(path)!r}: {exc}. Fix the file or unset "
                "LLMTRAIL_PRICES_FILE."
            ) from exc
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            raise ConfigurationError(
                f"price file {str(path)!r} has no 'models' object; expected "
                '{"models": {"gpt-4o": {"input": "2.50", "cached_input": "1.25", "output": "10"}}}'
            )
        return self.with_overrides(models, version=str(data.get("version") or path))

    def price(self, model: str) -> ModelPrice | None:
        found = self._prices.get(model)
        if found is None:
            base = _DATED.sub("", model)
            found = self._prices.get(base)
        return found

    def answer_cost(self, model: str, answer: ProviderResponse) -> Decimal | None:
        """An answer's cost: priced by the model that answered, else by the model asked for;
        None when neither has a price (unpriced, never $0)."""
        priced_as = answer.response_model
        if not priced_as or self.price(priced_as) is None:
            priced_as = model
        return self.cost(
            priced_as,
            input_tokens=answer.input_tokens,
            cached_tokens=answer.cached_tokens,
            output_tokens=answer.output_tokens,
        )

    def cost(
        self, model: str, *, input_tokens: int, cached_tokens: int = 0, output_tokens: int = 0
    ) -> Decimal | None:
        price = self.price(model)
        if price is None:
            return None
        cached = min(cached_tokens, input_tokens)
        micro = (
            (input_tokens - cached) * price.input
            + cached * price.cached_input
            + output_tokens * price.output
        )
        return micro / _MILLION

    def models(self) -> list[str]:
        return sorted(self._prices)


def _parse_price(model: str, raw: Mapping[str, str | float]) -> ModelPrice:
    try:
        inp = Decimal(str(raw["input"]))
        out = Decimal(str(raw["output"]))
        cached = Decimal(str(raw.get("cached_input", raw["input"])))
    except (KeyError, ArithmeticError, ValueError) as exc:
        raise ConfigurationError(
            f"price for model {model!r} is invalid ({raw!r}): give 'input', 'output' and "
            "optionally 'cached_input' as decimal USD per 1M tokens"
        ) from exc
    if min(inp, out, cached) < 0:
        raise ConfigurationError(f"price for model {model!r} is negative ({raw!r})")
    return ModelPrice(inp, cached, out)
