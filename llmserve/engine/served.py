"""The names a running server answers to, changed while it runs: LoRA adapters loaded and
unloaded at run time (`llmserve models load/unload`, POST /admin/models/load and /unload, vLLM's
/v1/load_lora_adapter), and the adapters and aliases of a reloaded config file.

    models = ServedModels(engine, config.engine)
    models.catalog                                  # a ModelCatalog, replaced whole
    await models.load("sql", "/srv/adapters/sql")
    in_flight = await models.unload("sql")
    async with models.reloading(old.engine, new.engine):  # server/reload.py
        ...  # the other components; leaving the block serves the file's changes at once,
             # an error inside it (or ConfigError on entering) changes nothing

The rules (docs/engine.md, "Adapters at run time"):
- A name is one model: a load under the name of the base model, an adapter or an alias is
  refused (409 model_exists), and so is unloading an adapter an alias names (409
  adapter_in_use). Unloading a name that is no adapter is 404.
- The engine loads the adapter first (a broken one: 400 adapter_invalid, and the engine holds
  nothing more); only then does the catalog change.
- After an unload, a request for the name is 404 at once; requests in flight finish on it.
- A reload applies what changed in the file since it was last read: entries added to
  `engine.lora.adapters` are loaded (with a new path: replaced), entries removed are unloaded,
  and `engine.aliases` becomes the file's. Adapters loaded at run time stay until unloaded.
  All of a reload's loads come first; if one fails the others are discarded: nothing changes.
One change at a time (a lock). The catalog is swapped in one assignment, with no await between
the engine serving a change and the catalog showing it: a request sees the old names or the new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from llmserve.config import EngineConfig, check_model_name
from llmserve.engine.base import Engine, EngineUnavailable, LoadedAdapter
from llmserve.engine.catalog import ModelCatalog
from llmserve.engine.vllm_lora import adapter_path
from llmserve.errors import (
    APIError,
    ConfigError,
    Conflict,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)

log = logging.getLogger("llmserve.models")


@dataclass(slots=True)
class _Plan:
    """What a reload changes: adapters to load (name -> path), names to unload, the aliases."""

    load: dict[str, str] = field(default_factory=dict)
    unload: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)


class ServedModels:
    def __init__(self, engine: Engine, config: EngineConfig) -> None:
        self._engine = engine
        # what the engine serves from its start: the file's adapters (name -> absolute path)
        self._adapters = {name: adapter_path(path) for name, path in config.lora.adapters.items()}
        self._aliases = dict(config.aliases)
        self._lock = asyncio.Lock()
        self.catalog = self._catalog()

    @property
    def adapters(self) -> Mapping[str, str]:
        """The adapters served, name -> path, in the order they were loaded."""
        return dict(self._adapters)

    async def load(self, name: str, path: str) -> str:
        """Load and serve the adapter at `path` as model `name`; return the path it was loaded
        from (local paths made absolute)."""
        async with self._lock:
            self._check_free(name)
            loaded = await self._load(name, path)
            self._engine.serve_adapter(loaded)
            self._adapters[name] = loaded.path
            self.catalog = self._catalog()
        log.info("adapter %r loaded from %s", name, loaded.path)
        return loaded.path

    async def unload(self, name: str) -> int:
        """Stop serving the adapter `name`; return the requests still running on it (they
        finish on it)."""
        async with self._lock:
            if name not in self._adapters:
                raise NotFound(f"No adapter '{name}' is loaded: it is {self._what(name)}.",
                               code="model_not_found", param="name")  # fmt: skip
            aliases = sorted(a for a, target in self._aliases.items() if target == name)
            if aliases:
                raise Conflict(
                    f"The adapter '{name}' has aliases ({', '.join(aliases)}): remove them from "
                    "engine.aliases and reload, then unload it.", code="adapter_in_use",
                )  # fmt: skip
            in_flight = self._engine.retire_adapter(name)
            del self._adapters[name]
            self.catalog = self._catalog()
        log.info("adapter %r unloaded (%d requests in flight finish on it)", name, in_flight)
        return in_flight

    @contextlib.asynccontextmanager
    async def reloading(self, old: EngineConfig, new: EngineConfig) -> AsyncIterator[None]:
        """Apply a reloaded file's adapters and aliases (what changed from `old` to `new`):
        loaded on entering (ConfigError naming the entry when one cannot be: nothing changed),
        served on leaving without an error, discarded on leaving with one."""
        async with self._lock:
            plan = self._plan(old, new)
            loaded = await self._load_all(plan.load)
            try:
                yield
            except BaseException:
                await self._discard(loaded)
                raise
            for adapter in loaded:
                self._engine.serve_adapter(adapter)
                self._adapters[adapter.name] = adapter.path
            for name in plan.unload:
                self._engine.retire_adapter(name)
                del self._adapters[name]
            self._aliases = plan.aliases
            self.catalog = self._catalog()
            for adapter in loaded:
                log.info("adapter %r loaded from %s (config reload)", adapter.name, adapter.path)
            for name in plan.unload:
                log.info("adapter %r unloaded (config reload)", name)

    def _plan(self, old: EngineConfig, new: EngineConfig) -> _Plan:
        before, after = old.lora.adapters, new.lora.adapters
        plan = _Plan(aliases=dict(new.aliases))
        for name, path in after.items():
            changed = before.get(name) != path
            if changed and self._adapters.get(name) != adapter_path(path):
                plan.load[name] = path
        plan.unload = [name for name in before if name not in after and name in self._adapters]
        served = (self._adapters.keys() - set(plan.unload)) | plan.load.keys()
        for alias, target in plan.aliases.items():
            if alias in served:
                raise ConfigError(f"engine.aliases.{alias}: already the name of an adapter "
                                  "loaded at run time")  # fmt: skip
            if target != self._engine.model_name and target not in served:
                raise ConfigError(f"engine.aliases.{alias}: the adapter {target!r} is not loaded "
                                  "(it was unloaded at run time): load it first")  # fmt: skip
        return plan

    async def _load_all(self, adapters: Mapping[str, str]) -> list[LoadedAdapter]:
        loaded: list[LoadedAdapter] = []
        for name, path in adapters.items():
            try:
                loaded.append(await self._load(name, path))
            except APIError as exc:
                await self._discard(loaded)
                raise ConfigError(f"engine.lora.adapters.{name}: {exc.message}") from None
            except BaseException:
                await self._discard(loaded)
                raise
        return loaded

    async def _load(self, name: str, path: str) -> LoadedAdapter:
        try:
            return await self._engine.load_adapter(name, path)
        except EngineUnavailable as exc:
            raise ServiceUnavailable(f"The model engine cannot load adapters now: {exc}.",
                                     code="engine_unavailable") from None  # fmt: skip

    async def _discard(self, loaded: list[LoadedAdapter]) -> None:
        for adapter in loaded:
            await self._engine.discard_adapter(adapter)

    def _check_free(self, name: str) -> None:
        try:
            check_model_name(name, "model name")
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="name") from None
        if name == self._engine.model_name or name in self._adapters or name in self._aliases:
            raise Conflict(f"The name '{name}' is taken: it is {self._what(name)}.",
                           code="model_exists", param="name")  # fmt: skip

    def _what(self, name: str) -> str:
        if name == self._engine.model_name:
            return "the base model"
        if name in self._adapters:
            return f"an adapter (from {self._adapters[name]})"
        if name in self._aliases:
            return f"an alias of '{self._aliases[name]}'"
        return "not a model this server serves"

    def _catalog(self) -> ModelCatalog:
        return ModelCatalog(self._engine.model_name, self._adapters, self._aliases)
