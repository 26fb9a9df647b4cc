"""The model names a server answers to: the base model, its LoRA adapters, and aliases of both.

Pure (no vllm): the API resolves a request's `model` here (api/models.py), and decides what a
caller's model allow-list lets it use. An alias is another name of a served model: a request
for it runs that model, its response names the alias. docs/engine.md, "LoRA adapters and
aliases", has the rules. A catalog never changes: engine/served.py builds a new one when
adapters or aliases change while the server runs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One name clients may send as `model`."""

    name: str  # what the request says, and what its response says
    root: str  # the model it runs: the base model's name or an adapter's
    adapter: str | None = None  # the LoRA adapter it runs (None: the base model)
    parent: str | None = None  # the base model of an adapter (None for the base model)
    alias: bool = False  # another name of `root`

    def allowed_by(self, models: Collection[str] | None) -> bool:
        """Whether a model allow-list (a key's or a token's `models`; None: every model)
        covers this name: it names it, or, for an alias, the model it stands for."""
        if models is None or self.name in models:
            return True
        return self.alias and self.root in models


class ModelCatalog:
    """Every name served: the base model first, then the adapters, then the aliases."""

    def __init__(
        self, base: str, adapters: Iterable[str] = (), aliases: Mapping[str, str] | None = None
    ) -> None:
        self.base = base
        entries = [ServedModel(base, base)]
        entries += [ServedModel(a, a, adapter=a, parent=base) for a in adapters if a != base]
        own = {entry.name: entry for entry in entries}
        for alias, target in (aliases or {}).items():
            model = own.get(target)
            if model is None or alias in own:
                continue  # the config and engine/served.py refuse these: never a dangling name
            entries.append(ServedModel(alias, model.root, model.adapter, model.parent, True))
        self._entries = tuple(entries)
        self._by_name = {entry.name: entry for entry in entries}

    def get(self, name: str) -> ServedModel | None:
        return self._by_name.get(name)

    @property
    def entries(self) -> tuple[ServedModel, ...]:
        return self._entries

    def visible_to(self, models: Collection[str] | None) -> list[ServedModel]:
        """The names an allow-list lets its holder use, in catalog order."""
        return [entry for entry in self._entries if entry.allowed_by(models)]
