"""The error tree. Every failure a client can see is an `APIError` with its HTTP meaning.

LLMServeError
├── ConfigError                      a config file is wrong (CLI prints it, exits 2)
├── EngineStartError                 the engine could not be built or loaded
└── APIError (status, type, code)    rendered as the OpenAI error body by one middleware
    ├── InvalidRequest          400  invalid_request_error   (bad field, bad JSON, n>1 ...)
    │   └── ContextLengthExceeded 400 context_length_exceeded
    ├── AuthenticationFailed    401  missing_api_key / invalid_api_key / token_expired ...
    ├── PermissionDenied        403  model_not_allowed / admin_required
    ├── NotFound                404  model_not_found / not_found
    ├── MethodNotAllowed        405
    ├── RequestTimeout          408  request_timeout (the body did not arrive in time)
    ├── Conflict                409  model_exists / adapter_in_use / adapter_limit / lora_disabled
    ├── PayloadTooLarge         413
    ├── UnsupportedMediaType    415
    ├── RateLimited             429  rate_limit_exceeded (+ Retry-After)
    ├── InternalError           500  internal_error (message generic; details only logged)
    ├── EngineFailed            500  engine_error (generation failed)
    ├── DeadlineExceeded        504  deadline_exceeded (the client's X-Request-Timeout passed)
    └── ServiceUnavailable      503  server_overloaded / queue_timeout / engine_unavailable
                                     / shutting_down / limiter_unavailable (+ Retry-After)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class LLMServeError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigError(LLMServeError):
    """A config file is missing or wrong; the message names the file and the setting."""


class EngineStartError(LLMServeError):
    """The engine could not be started (bad model path, bad engine option, ...)."""


class APIError(LLMServeError):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def retry_after_header(seconds: float) -> dict[str, str]:
    """Retry-After is whole seconds, at least 1 (HTTP allows no fractions)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class InvalidRequest(APIError):
    status = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class AuthenticationFailed(APIError):
    status = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(APIError):
    status = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class NotFound(APIError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(APIError):
    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeout(APIError):
    status = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class Conflict(APIError):
    """The request clashes with the server's state (an admin change that cannot apply now)."""

    status = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(APIError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaType(APIError):
    status = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(APIError):
    status = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    limit: str | None = None  # the window that refused: "tokens_per_minute", ... (for metrics)
    limit_model: str | None = None  # the model whose own window it is (None: the tier's own)


class InternalError(APIError):
    status = 500
    error_type = "server_error"
    default_code = "internal_error"


class EngineFailed(APIError):
    status = 500
    error_type = "server_error"
    default_code = "engine_error"


class ServiceUnavailable(APIError):
    status = 503
    error_type = "server_error"
    default_code = "server_overloaded"


class DeadlineExceeded(APIError):
    """The client's own deadline (X-Request-Timeout) passed before the request could finish.

    504 as in gRPC's DEADLINE_EXCEEDED mapping: the server gave up on the caller's schedule.
    No Retry-After: retrying with the same deadline under the same load would fail again.
    """

    status = 504
    error_type = "server_error"
    default_code = "deadline_exceeded"


def shutting_down(*, cut_short: bool = False) -> ServiceUnavailable:
    """The one 503 of a draining server (new requests, waiting ones, and, with `cut_short`, a
    response the shutdown's grace time ended)."""
    cut = " the response was cut short;" if cut_short else ""
    return ServiceUnavailable(
        f"The server is shutting down;{cut} retry on another instance or in a moment.",
        code="shutting_down",
        headers=retry_after_header(1),
    )
