"""Change a running server's settings without restarting its engine.

    reloader = Reloader(app, config, source=Path("llmserve.yaml"), overrides={"port": 8080})
    result = await reloader.reload()  # SIGHUP, POST /admin/reload, server.watch_config

The file is read again and compared with the running config, setting by setting:

- nothing changed: `unchanged`;
- the file does not parse or validate: `invalid`, and nothing changes;
- a setting that needs a new engine or a new listener changed (config.RESTART_ONLY: anything under
  `engine:` but its LoRA adapters and aliases, the listen addresses, the stores behind limits,
  keys and usage): `refused`, the message names the settings, and nothing changes;
- otherwise `applied`: tiers and their limits, `default_tier`, queue settings, auth settings
  (JWTs, cache times), CORS, logging, heartbeats and the per-request bounds take effect for the
  requests that start from now on; adapters added to `engine.lora.adapters` are loaded, those
  removed unloaded, and `engine.aliases` applied (engine/served.py; an adapter that cannot be
  loaded makes the reload `refused`). A request in flight keeps what it started with: its tier
  plan, its reservation and its place in the queue.

Command-line overrides of `llmserve up` (`--host`, `--port`) are applied to each new reading,
so they never count as a change. `llmserve_config_reloads_total{result}` counts the outcomes;
`llmserve_config_info{sha256}` names the file that is live.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from llmserve.app_state import AUTHENTICATOR, GATEWAY, METRICS
from llmserve.config import Config, parse_config, restart_only
from llmserve.errors import ConfigError
from llmserve.logs import configure_logging

log = logging.getLogger("llmserve.reload")

Outcome = Literal["applied", "unchanged", "invalid", "refused"]

@dataclass(frozen=True, slots=True)
class ReloadResult:
    outcome: Outcome
    message: str
    changed: tuple[str, ...] = ()
    sha256: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"result": self.outcome, "message": self.message, "changed": list(self.changed),
                "sha256": self.sha256}  # fmt: skip


def changed_settings(old: Config, new: Config) -> list[str]:
    """Dotted names of the settings whose values differ (a tier added or removed counts as
    `limits.tiers.<name>`). Python values, not JSON: JSON masks every secret as `**********`,
    so that a new JWT secret would read as no change."""
    return sorted(_diff(old.model_dump(), new.model_dump(), ""))


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in old.keys() | new.keys():
            name = f"{prefix}{key}"
            if key not in old or key not in new:
                out.append(name)
            else:
                out.extend(_diff(old[key], new[key], name + "."))
        return out
    return [] if old == new else [prefix.rstrip(".")]


# Settings naming a file of keys: a reload reads the file again when its content changed, even
# at the same path (a key rotated in place), and reports the setting as changed.
KEY_FILE_SETTINGS = ("auth.jwt.public_key_file", "auth.jwt.jwks_file")


def key_file_digests(config: Config) -> dict[str, str | None]:
    """SHA-256 of each key file the config names (None: unset, missing or unreadable)."""
    jwt = config.auth.jwt
    paths = {
        "auth.jwt.public_key_file": jwt.public_key_file if jwt is not None else None,
        "auth.jwt.jwks_file": jwt.jwks_file if jwt is not None else None,
    }
    return {name: _digest(path) for name, path in paths.items()}


def _digest(path: Path | str | None) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass
class Reloader:
    app: web.Application
    config: Config
    source: Path | None
    overrides: Mapping[str, Any] = field(default_factory=dict)  # server.* set on the command line
    sha256: str = ""
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _key_files: dict[str, str | None] = field(default_factory=dict)  # what the live keys came from

    def __post_init__(self) -> None:
        self._key_files = key_file_digests(self.config)
        if self.source is not None and not self.sha256:
            try:
                self.sha256 = hashlib.sha256(self.source.read_bytes()).hexdigest()
            except OSError:
                self.sha256 = ""

    async def reload(self) -> ReloadResult:
        async with self._lock:  # one at a time: SIGHUPs in a burst apply in order
            result = await self._reload()
        level = logging.INFO if result.outcome in ("applied", "unchanged") else logging.ERROR
        log.log(level, "config reload %s: %s", result.outcome, result.message)
        metrics = self.app.get(METRICS)
        if metrics is not None:
            metrics.config_reloaded(result.outcome, self.sha256)
        return result

    async def _reload(self) -> ReloadResult:
        if self.source is None:
            return ReloadResult("invalid", "the server was not started from a config file")
        try:
            text = self.source.read_bytes()
            new = self._with_overrides(parse_config(text.decode("utf-8"), str(self.source)))
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            return ReloadResult("invalid", f"nothing changed: {exc}", sha256=self.sha256)
        digest = hashlib.sha256(text).hexdigest()
        key_files = key_file_digests(new)
        rewritten = {name for name, file in key_files.items() if file != self._key_files.get(name)}
        changed = sorted(set(changed_settings(self.config, new)) | rewritten)
        if not changed:
            self.sha256 = digest
            return ReloadResult("unchanged", "the file matches the running config", (), digest)
        blocked = [name for name in changed if restart_only(name)]
        if blocked:
            return ReloadResult(
                "refused",
                "nothing changed: these settings need a restart: " + ", ".join(blocked),
                tuple(changed), self.sha256,
            )  # fmt: skip
        try:
            await self._apply(new)
        except ConfigError as exc:
            return ReloadResult("refused", f"nothing changed: {exc}", tuple(changed), self.sha256)
        self.config, self.sha256, self._key_files = new, digest, key_files
        return ReloadResult("applied", ", ".join(changed), tuple(changed), digest)

    def _with_overrides(self, config: Config) -> Config:
        if not self.overrides:
            return config
        return config.model_copy(update={"server": config.server.model_copy(update=self.overrides)})

    async def _apply(self, new: Config) -> None:
        """Hand the new settings to every component; checks first, so that a refusal leaves
        everything as it was. The file's new adapters are loaded first and served last
        (engine/served.py): a reload that fails anywhere leaves the models as they were."""
        async with self.app[GATEWAY].models.reloading(self.config.engine, new.engine):
            await self._reconfigure(new)

    async def _reconfigure(self, new: Config) -> None:
        gateway = self.app[GATEWAY]
        authenticator = self.app.get(AUTHENTICATOR)
        if authenticator is not None:
            await authenticator.reconfigure(new.auth, new.limits.tiers)
        if gateway.limiter is not None:
            gateway.limiter.reconfigure(new.limits)
        if gateway.admission is not None:
            gateway.admission.reconfigure(new)
        gateway.reconfigure(new)
        configure_logging(new.logging)
