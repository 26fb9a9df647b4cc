"""What a principal may do once authenticated: checks the handlers and the middleware call."""

from __future__ import annotations

from llmserve.auth.principal import Principal
from llmserve.errors import PermissionDenied


def ensure_model_allowed(principal: Principal, model: str) -> None:
    """403 `model_not_allowed` unless the principal may use `model`."""
    if not principal.may_use(model):
        raise PermissionDenied(
            f"This credential may not use the model {model!r}.",
            code="model_not_allowed",
            param="model",
        )


def ensure_admin(principal: Principal) -> None:
    """403 `admin_required` unless the principal is an admin (for /metrics and /ready)."""
    if not principal.admin:
        raise PermissionDenied("This endpoint needs an admin credential.", code="admin_required")
