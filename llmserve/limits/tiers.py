"""From a principal's tier name and per-key overrides to the windows that limit it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from llmserve.config import LimitsConfig, TierConfig, WindowLimits
from llmserve.errors import ConfigError, PermissionDenied
from llmserve.limits.windows import RULE_SHAPES, WindowRule, make_rule

# What a key may override: the limits and the default output cap (all whole numbers).
OVERRIDABLE = (*RULE_SHAPES, "default_max_tokens")


@dataclass(frozen=True, slots=True)
class TierPlan:
    """A tier as the limiter applies it: its windows and how to price a request."""

    name: str
    rules: tuple[WindowRule, ...]
    completion_token_weight: float
    default_max_tokens: int | None
    priority: int
    shadow_rules: tuple[WindowRule, ...] = ()  # counted, never enforced
    # per served model: its own windows, enforced with `rules` for the requests that run it
    model_rules: Mapping[str, tuple[WindowRule, ...]] = field(default_factory=dict, hash=False)

    def token_cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Prompt tokens plus weighted completion tokens, rounded up to whole tokens."""
        weighted = math.ceil(self.completion_token_weight * completion_tokens - 1e-9)
        return prompt_tokens + weighted

    def rules_for(self, model: str | None) -> tuple[WindowRule, ...]:
        """The windows a request running `model` (the base model or an adapter, never an
        alias) must fit: the tier's own, then the model's."""
        own = self.model_rules.get(model) if model is not None else None
        return self.rules + own if own else self.rules

    @property
    def all_rules(self) -> tuple[WindowRule, ...]:
        """Every enforced window: the tier's own, then each model's (for usage reports)."""
        return self.rules + tuple(rule for rules in self.model_rules.values() for rule in rules)


def validate_overrides(overrides: Mapping[str, int]) -> None:
    """Raise ConfigError if a key's overrides name an unknown setting or a bad value."""
    _merged_tier(TierConfig(), overrides)


def plan_tier(
    config: LimitsConfig, tier_name: str | None, overrides: Mapping[str, int]
) -> TierPlan:
    name = tier_name or config.default_tier
    tier = config.tiers.get(name)
    if tier is None:
        raise PermissionDenied(
            f"Your credentials name the rate-limit tier {name!r}, which this server does not "
            "define. Ask the operator to fix the key or the token.",
            code="unknown_tier",
        )
    tier = _merged_tier(tier, overrides) if overrides else tier
    rules = _rules(tier)
    shadow = _rules(tier.shadow) if tier.shadow is not None else ()
    models = {model: own for model, limits in tier.models.items()
              if (own := _rules(limits, model))}  # fmt: skip
    return TierPlan(name, rules, tier.completion_token_weight, tier.default_max_tokens,
                    tier.priority, shadow, models)  # fmt: skip


def _rules(limits: WindowLimits, model: str | None = None) -> tuple[WindowRule, ...]:
    return tuple(make_rule(name, limit, model) for name in RULE_SHAPES
                 if (limit := getattr(limits, name)) is not None)  # fmt: skip


def _merged_tier(tier: TierConfig, overrides: Mapping[str, int]) -> TierConfig:
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ConfigError(
            f"limit overrides: unknown setting(s) {', '.join(unknown)}; "
            f"expected some of: {', '.join(OVERRIDABLE)}"
        )
    try:
        return TierConfig.model_validate({**tier.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"limit overrides: {problems}") from None
