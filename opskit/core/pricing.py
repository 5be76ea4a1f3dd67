"""Token prices of a target and the cost of one call. Pure code: no I/O, the time is passed in.

No price is built in (they change): a target's config may carry them, per million tokens, in one
currency, with optional off-peak windows (UTC) and their discount, as DeepSeek has:

    targets:
      - name: deepseek
        base_url: https://api.deepseek.com
        prices:
          currency: USD
          per_million_tokens:
            deepseek-chat: {input: 0.27, cached_input: 0.07, output: 1.10}
          off_peak: [{start: "16:30", end: "00:30", discount: 0.5}]   # UTC; end may wrap past midnight
          daily_budget: 50        # optional, in `currency`: arms the LLMSpendBudgetBurn alert

`input` is billed for the uncached part of the input (input - cached_input), `cached_input` for the
cached part (default: the input price), `output` for all output tokens (reasoning included). A model
without a price has no spend (its tokens are still counted). `daily_budget` is what the target may
spend a day, in the same currency; without one no spend alert is armed for the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PRICE_KEYS = ("currency", "per_million_tokens", "off_peak", "daily_budget")
MODEL_KEYS = ("input", "cached_input", "output")


class PricingError(ValueError):
    """A malformed `prices` section: `key` says where, the message what was expected."""

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(expected)
        self.key, self.expected = key, expected


@dataclass(frozen=True)
class ModelPrice:
    """Prices per million tokens."""

    input: float
    output: float
    cached_input: float


@dataclass(frozen=True)
class OffPeak:
    """A daily UTC window [start, end) in minutes after midnight (end < start wraps), and its discount."""

    start_min: int
    end_min: int
    discount: float

    def covers(self, minute: int) -> bool:
        if self.start_min <= self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min


@dataclass(frozen=True)
class Prices:
    """A target's prices: one currency, per model, with off-peak windows, and an optional daily budget
    in that currency."""

    currency: str
    models: dict[str, ModelPrice] = field(default_factory=dict)
    off_peak: tuple[OffPeak, ...] = ()
    daily_budget: float | None = None

    def cost(self, model: str, input_tokens: int, cached_input_tokens: int, output_tokens: int,
             unix_time: float) -> float | None:
        """What one call cost, in `currency`; None when the model has no price."""
        p = self.models.get(model)
        if p is None:
            return None
        cached = min(cached_input_tokens, input_tokens)
        cost = ((input_tokens - cached) * p.input + cached * p.cached_input + output_tokens * p.output) / 1e6
        minute = int(unix_time // 60) % (24 * 60)
        for w in self.off_peak:
            if w.covers(minute):
                return cost * (1.0 - w.discount)
        return cost


def _price(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise PricingError(key, "a non-negative number (price per million tokens)")
    return float(value)


def _minute(value: object, key: str) -> int:
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) > 23 or int(parts[1]) > 59:
        raise PricingError(key, 'a UTC time "HH:MM"')
    return int(parts[0]) * 60 + int(parts[1])


def parse(spec: object, key: str = "prices") -> Prices:
    """Prices from a config mapping; PricingError names the key that is wrong."""
    if not isinstance(spec, dict) or set(spec) - set(PRICE_KEYS):
        raise PricingError(key, f"a mapping with {', '.join(PRICE_KEYS)}")
    currency = spec.get("currency")
    if not isinstance(currency, str) or not currency.isalpha() or len(currency) > 8:
        raise PricingError(f"{key}.currency", "a currency code such as USD or CNY")
    per = spec.get("per_million_tokens")
    if not isinstance(per, dict) or not per:
        raise PricingError(f"{key}.per_million_tokens", "a mapping of model names to prices")
    models = {}
    for model, p in per.items():
        mk = f"{key}.per_million_tokens.{model}"
        if not isinstance(p, dict) or set(p) - set(MODEL_KEYS) or not {"input", "output"} <= set(p):
            raise PricingError(mk, "a mapping with input, output and optionally cached_input")
        inp = _price(p["input"], f"{mk}.input")
        models[str(model)] = ModelPrice(inp, _price(p["output"], f"{mk}.output"),
                                        _price(p.get("cached_input", inp), f"{mk}.cached_input"))
    windows = []
    for i, w in enumerate(spec.get("off_peak") or []):
        wk = f"{key}.off_peak[{i}]"
        if not isinstance(w, dict) or set(w) != {"start", "end", "discount"}:
            raise PricingError(wk, "a mapping with start, end (UTC HH:MM) and discount (0-1)")
        d = w["discount"]
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d <= 1:
            raise PricingError(f"{wk}.discount", "a share between 0 and 1")
        windows.append(OffPeak(_minute(w["start"], f"{wk}.start"), _minute(w["end"], f"{wk}.end"), float(d)))
    budget = spec.get("daily_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)
                               or not math.isfinite(budget) or budget <= 0):
        raise PricingError(f"{key}.daily_budget", "a positive number (spend a day, in the prices' currency)")
    return Prices(currency.upper(), models, tuple(windows), None if budget is None else float(budget))
