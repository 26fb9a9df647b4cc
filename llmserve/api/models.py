"""A request's `model`: which served model it names (the base model, a LoRA adapter, or an alias
of either, engine/catalog.py), whether the caller may use it, and the name its response gives.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from llmserve.auth.principal import Principal
from llmserve.engine.catalog import ModelCatalog, ServedModel
from llmserve.errors import NotFound, PermissionDenied

if TYPE_CHECKING:
    from llmserve.api.gateway import Gateway


def catalog_of(gateway: Gateway) -> ModelCatalog:
    """The names served now (engine/served.py: adapters and aliases change while it runs)."""
    return gateway.models.catalog


def resolve_model(gateway: Gateway, model: str, principal: Principal) -> ServedModel:
    """The served model `model` names: 404 model_not_found when none, 403 model_not_allowed when
    the caller's allow-list does not cover it."""
    entry = catalog_of(gateway).get(model)
    if entry is None:
        raise NotFound(
            f"The model '{model}' does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    if not entry.allowed_by(principal.models):
        raise PermissionDenied(
            f"This API key is not allowed to use the model '{model}'.",
            code="model_not_allowed",
            param="model",
        )
    return entry


def visible_models(gateway: Gateway, principal: Principal) -> list[ServedModel]:
    """What /v1/models lists for this caller: the names it may use."""
    return catalog_of(gateway).visible_to(principal.models)


class ModelRename:
    """Puts the requested name back into what vLLM's handlers answer for an alias (they are
    given the model the alias stands for, and name it in every response and chunk).

    vLLM writes its JSON compactly, and a string inside a JSON value has its quotes escaped, so
    `"model":"<root>"` occurs only as a real `model` member: that text is what is replaced."""

    __slots__ = ("_new", "_new_bytes", "_old", "_old_bytes")

    def __init__(self, root: str, requested: str) -> None:
        self._old = f'"model":{json.dumps(root)}'
        self._new = f'"model":{json.dumps(requested)}'
        self._old_bytes = self._old.encode()
        self._new_bytes = self._new.encode()

    def text(self, event: str) -> str:
        return event.replace(self._old, self._new)

    def body(self, body: bytes) -> bytes:
        return body.replace(self._old_bytes, self._new_bytes)
