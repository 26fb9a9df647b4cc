"""OpenAI request bodies of the fast path, validated strictly, with errors that name the
offending parameter.

The fast path handles plain text generation (the bulk of traffic) without the engine's own
request models. A request it does not handle (tools, structured outputs, logprobs, n > 1,
vLLM's extra fields, tool messages...) raises `NotNative`: the handler then passes it to the
engine's own OpenAI frontend (vLLM's serving classes), or, with an engine that has none, answers
it with this error's 400.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmserve.errors import InvalidRequest


class NotNative(InvalidRequest):
    """The fast path does not handle this request; the engine's own frontend may."""


# Parameters OpenAI defines that this server does not implement. Their neutral values (null,
# false, empty) are accepted so generic clients keep working; anything else is a 400 naming them.
UNSUPPORTED_CHAT = (
    "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
    "response_format", "logit_bias", "parallel_tool_calls", "modalities", "audio", "prediction",
    "reasoning_effort", "web_search_options", "service_tier", "store", "metadata",
)  # fmt: skip
UNSUPPORTED_COMPLETION = ("logprobs", "echo", "suffix", "best_of", "logit_bias")

ROLES = ("system", "developer", "user", "assistant")
_NEUTRAL: tuple[Any, ...] = (None, False, [], {}, "auto", "none")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    # vLLM's extensions, accepted as `vllm serve` does (its `vllm bench serve` sends them)
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    top_k: int | None = Field(None, ge=-1)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_sequences(cls, value: Any) -> Any:
        # before the items' types are checked: a list of a million wrong items is one error
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @model_validator(mode="after")
    def _checks(self) -> _Common:
        if self.n not in (None, 1):
            raise NotNative(
                "Only n=1 is supported by this server; send n parallel requests instead.",
                param="n",
                code="unsupported_value",
            )
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        return self

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # accepted at their neutral values only (see UNSUPPORTED_CHAT)
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logit_bias: Any = None
    parallel_tool_calls: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, messages: Any) -> Any:
        # each message checked once, by hand, and the first bad one is the error (pydantic
        # would first build one error per bad item: seconds for a body of two million)
        if not isinstance(messages, list):
            return messages  # pydantic's own type error
        return [_normalize_message(i, m) for i, m in enumerate(messages)]

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        _reject_unsupported(self, UNSUPPORTED_CHAT)
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: Any = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None
    logit_bias: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        # before the items' types are checked; a batch or token ids are the engine's to answer
        if isinstance(prompt, list) and (len(prompt) != 1 or not isinstance(prompt[0], str)):
            raise NotNative(
                "Invalid value for 'prompt': exactly one prompt string is supported per request.",
                param="prompt",
            )
        return prompt

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        _reject_unsupported(self, UNSUPPORTED_COMPLETION)
        return self

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens


def _reject_unsupported(request: BaseModel, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(request, name)
        neutral = value in _NEUTRAL or (name == "best_of" and value == 1)
        if not neutral:
            raise NotNative(
                f"The '{name}' parameter is not supported by this server.",
                param=name,
                code="unsupported_parameter",
            )


def _normalize_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"Invalid type for '{where}': expected an object.", param=where)
    role = message.get("role")
    if role not in ROLES:
        raise (NotNative if isinstance(role, str) else InvalidRequest)(
            f"Invalid value for '{where}.role': expected one of {', '.join(ROLES)}"
            f" (tool messages are not supported).",
            param=f"{where}.role",
        )
    unknown = set(message) - {"role", "content", "name"}
    if unknown:
        name = sorted(unknown)[0]
        raise NotNative(
            f"Unsupported field '{where}.{name}' (tool calls are not supported).",
            param=f"{where}.{name}",
        )
    content = _content_text(where, message.get("content"))
    return {"role": "system" if role == "developer" else role, "content": content}


def _content_text(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise NotNative(
                    f"Invalid content part '{where}.content[{i}]': only text parts "
                    '({"type": "text", "text": "..."}) are supported.',
                    param=f"{where}.content[{i}]",
                )
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins text parts
    raise InvalidRequest(
        f"Invalid type for '{where}.content': expected a string or a list of text parts.",
        param=f"{where}.content",
    )


# ---------------------------------------------------------------------------------------------

RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_request(model: type[RequestT], body: dict[str, Any]) -> RequestT:
    """Validate a parsed JSON body (api/body.py) against a request model, turning pydantic's
    errors into a 400. `body` is left as it was: the engine's frontend may get it next."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _as_invalid_request(exc) from None


def _as_invalid_request(exc: ValidationError) -> InvalidRequest:
    err = exc.errors(include_url=False)[0]
    kind = err["type"]
    param = _param_name(err["loc"])
    if kind in ("model_type", "model_attributes_type") and not err["loc"]:
        return InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        return NotNative(
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unknown_parameter",
        )
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    wrapped = err.get("ctx", {}).get("error")
    if isinstance(wrapped, InvalidRequest):
        return wrapped
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    prefix = "Invalid type" if kind.endswith("_type") or kind == "bool_parsing" else "Invalid value"
    return InvalidRequest(f"{prefix} for '{param}': {message}.", param=param)


def _param_name(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "int", "float", "bool") or "[" in str(part):
            continue  # union branch names that pydantic adds to locations
        else:
            out += f".{part}" if out else str(part)
    return out
