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


# Responses API fields that need a stored response, which llmserve does not keep.
NEEDS_STORE: dict[str, str] = {
    "previous_response_id": "send the earlier turns in `input` instead",
    "background": "run it in the foreground (stream it for progress)",
}


def check_responses_store(body: dict[str, Any]) -> None:
    for name, advice in NEEDS_STORE.items():
        if body.get(name):
            raise InvalidRequest(
                f"'{name}' needs a stored response, and this server stores none: {advice}.",
                param=name,
                code="unsupported_parameter",
            )


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


def _names(text: str) -> list[str]:
    return text.split()


# The request fields of vLLM 0.32.0's own models, as reviewed: every one is answered by vLLM's
# handlers unless listed above. The drift guard (tests/engine/test_engine_request_fields.py)
# fails when the installed vLLM's models differ, so that a new field (one that could bypass
# metering, say) is looked at before it is served.
ENGINE_FIELDS: dict[str, frozenset[str]] = {
    "chat": frozenset(
        _names("""
        add_generation_prompt add_special_tokens allowed_token_ids bad_words cache_salt
        chat_template chat_template_kwargs continue_final_message documents ec_transfer_params
        echo frequency_penalty ignore_eos include_reasoning include_stop_str_in_output
        kv_transfer_params length_penalty logit_bias logprob_token_ids logprobs
        max_completion_tokens max_tokens media_io_kwargs messages min_p min_tokens mm_payload
        mm_processor_kwargs model n parallel_tool_calls presence_penalty priority
        prompt_logprobs reasoning_effort repetition_detection repetition_penalty request_id
        response_format return_mm_kwargs return_prompt_text return_token_ids
        return_token_offsets return_tokens_as_token_ids routed_experts_prompt_start seed
        session_id skip_special_tokens spaces_between_special_tokens stop stop_token_ids stream
        stream_interval stream_options structured_outputs temperature thinking_token_budget
        tool_choice tools top_k top_logprobs top_p truncate_prompt_tokens truncation_side
        use_beam_search user vllm_xargs watermarking
    """)
    ),
    "completions": frozenset(
        _names("""
        add_special_tokens allowed_token_ids bad_words cache_salt ec_transfer_params echo
        frequency_penalty ignore_eos include_stop_str_in_output kv_transfer_params
        length_penalty logit_bias logprob_token_ids logprobs max_tokens min_p min_tokens
        mm_payload model n presence_penalty priority prompt prompt_embeds prompt_logprobs
        repetition_detection repetition_penalty request_id response_format return_mm_kwargs
        return_token_ids return_token_offsets return_tokens_as_token_ids
        routed_experts_prompt_start seed session_id skip_special_tokens
        spaces_between_special_tokens stop stop_token_ids stream stream_interval stream_options
        structured_outputs suffix temperature thinking_token_budget top_k top_p
        truncate_prompt_tokens truncation_side use_beam_search user vllm_xargs watermarking
    """)
    ),
    "responses": frozenset(
        _names("""
        background cache_salt chat_template_kwargs ec_transfer_params enable_response_messages
        frequency_penalty ignore_eos include include_reasoning include_stop_str_in_output input
        instructions kv_transfer_params logit_bias max_output_tokens max_tool_calls
        media_io_kwargs metadata min_p mm_payload mm_processor_kwargs model parallel_tool_calls
        presence_penalty previous_input_messages previous_response_id priority prompt
        prompt_cache_key reasoning repetition_penalty request_id return_mm_kwargs seed
        service_tier session_id skip_special_tokens stop stop_token_ids store stream
        structured_outputs temperature text tool_choice tools top_k top_logprobs top_p
        truncation user vllm_xargs watermarking
    """)
    ),
}

# Fields the fast path answers itself (plain text generation; api/schemas.py).
FAST_PATH: dict[str, frozenset[str]] = {
    "chat": frozenset(
        _names("""
        frequency_penalty ignore_eos max_completion_tokens max_tokens messages model n
        presence_penalty repetition_penalty seed stop stream stream_options temperature top_k
        top_p user
    """)
    ),
    "completions": frozenset(
        _names("""
        frequency_penalty ignore_eos max_tokens model n presence_penalty prompt
        repetition_penalty seed stop stream stream_options temperature top_k top_p user
    """)
    ),
}


def how_handled(route: str, name: str) -> str:
    """One cell of docs/api.md's field table."""
    if name in REFUSED:
        return f"refused unless neutral: {REFUSED[name]}"
    if name in IGNORED and name not in _ROUTE_IGNORED.get(route, frozenset()):
        return f"accepted, ignored: {IGNORED[name]}"
    if name in GATEWAY:
        return GATEWAY[name]
    if route == "responses" and name in NEEDS_STORE:
        return f"refused unless neutral: needs a response store ({NEEDS_STORE[name]})"
    if name in FAST_PATH.get(route, frozenset()):
        return "supported (fast path)"
    return "supported (vLLM)"


BEGIN = "<!-- request-fields:begin (generated: python -m llmserve.api.fields docs/api.md) -->"
END = "<!-- request-fields:end -->"


def render_table() -> str:
    extra = {*REFUSED, *IGNORED, *GATEWAY}
    names = sorted(set().union(*ENGINE_FIELDS.values()) | extra)
    rows = ["| field | chat | completions | responses |", "|---|---|---|---|"]
    for name in names:
        cells = []
        for route in ("chat", "completions", "responses"):
            known = name in ENGINE_FIELDS[route] or name in extra
            cells.append(how_handled(route, name) if known else "-")
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join([BEGIN, *rows, END])


def update_doc(path: str) -> None:
    from pathlib import Path

    doc = Path(path)
    text = doc.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + render_table() + text[end:])


if __name__ == "__main__":
    import sys

    update_doc(sys.argv[1])
