"""Who is calling: the result of authentication, used by every gate after it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Principal:
    id: str  # a key's public id or a JWT subject; never a secret
    tier: str | None = None  # None: the config's limits.default_tier
    models: frozenset[str] | None = None  # None: every model
    kind: str = "key"  # "key" | "jwt" | "anonymous"
    admin: bool = False  # may read /metrics and /ready when they are not public
    limit_overrides: dict[str, int] = field(default_factory=dict)  # per-key tier overrides

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = Principal(id="anonymous", kind="anonymous")
