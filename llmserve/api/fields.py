"""Which request fields llmserve handles how: the one place that lists deliberate refusals.

Every field of vLLM's own request models is answered as `vllm serve` answers it (the fast path
for plain text generation, vLLM's own handlers for the rest), except the ones below. A test
(the drift guard) fails when the installed vLLM accepts a field this module does not know.
"""

from __future__ import annotations

from typing import Any

from llmserve.errors import InvalidRequest

# Refused (400) when set to anything but a neutral value, with the reason given to the caller.
REFUSED: dict[str, str] = {
    "use_beam_search": "beam search resubmits the prompt at every step, which the rate limiter "
    "cannot meter; sample with n > 1 instead",
    "kv_transfer_params": "it belongs to vLLM's disaggregated prefill between trusted servers",
    "ec_transfer_params": "it belongs to vLLM's disaggregated encoding between trusted servers",
    "functions": "it is OpenAI's deprecated form of tools; send tools and tool_choice",
    "function_call": "it is OpenAI's deprecated form of tool_choice; send tools and tool_choice",
    "modalities": "this server generates text only",
    "audio": "this server generates text only",
    "prediction": "predicted outputs are not supported by vLLM",
    "web_search_options": "this server has no web search",
}

# Accepted and not passed on: OpenAI fields with no meaning here, and vLLM's client-chosen
# request id (ids are the server's: X-Request-Id, so one caller cannot address another's).
IGNORED: dict[str, str] = {
    "request_id": "request ids are assigned by the server (see X-Request-Id)",
    "store": "nothing is stored",
    "service_tier": "the caller's tier comes from its key",
    "prompt_cache_key": "vLLM caches prefixes automatically",
    "safety_identifier": "no meaning here",
    "user": "no meaning here",
}

# Consumed by the gateway itself.
GATEWAY: dict[str, str] = {
    "metadata": "kept in the usage ledger (at most 16 string pairs)",
    "priority": "bounded by the caller's tier: it may lower a request's urgency, never raise it",
}

_NEUTRAL: tuple[Any, ...] = (None, False, [], {}, "none", "auto")
_ROUTE_IGNORED = {"responses": frozenset({"user", "store", "service_tier"})}


def check_refused(body: dict[str, Any]) -> None:
    """Raise the 400 of the first deliberately refused field set to a non-neutral value."""
    for name, reason in REFUSED.items():
        if name in body and body[name] not in _NEUTRAL:
            raise InvalidRequest(
                f"The '{name}' parameter is not supported by this server: {reason}.",
                param=name,
                code="unsupported_parameter",
            )


def strip_for_engine(route: str, body: dict[str, Any], known: frozenset[str]) -> None:
    """Drop what the engine's request model must not see: refused fields at their neutral
    values, ignored fields (unless the route's own model gives them a meaning), and the
    gateway's own."""
    keep = _ROUTE_IGNORED.get(route, frozenset())
    for name in (*REFUSED, *IGNORED, "metadata"):
        if name in body and (name not in keep or name not in known):
            del body[name]


def check_known(body: dict[str, Any], known: frozenset[str]) -> None:
    """Refuse a field that neither the engine's request model nor this module knows, as OpenAI
    does (`vllm serve` ignores such fields, so a typo goes unnoticed)."""
    for name in body:
        if name not in known and name not in IGNORED and name not in GATEWAY:
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {name}",
                param=name,
                code="unknown_parameter",
            )
