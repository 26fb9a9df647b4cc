"""The configuration tree and loading it from one YAML file.

Every setting is declared once below, with its default and its meaning (the `description`).
`tests/test_docs.py` fails when a setting is missing from docs/configuration.md.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from llmserve.errors import ConfigError
from llmserve.masking import mask_tree

PositiveByteSize = Annotated[ByteSize, Field(gt=0)]
_BYTE_SIZE: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)

log = logging.getLogger("llmserve.config")

DEFAULT_CONFIG_FILE = "llmserve.yaml"
CONFIG_ENV_VAR = "LLMSERVE_CONFIG"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class CorsConfig(Section):
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Origins (`https://app.example.com`, or `*` for any) whose pages may call "
        "the API from a browser; empty = CORS off.",
    )
    allowed_methods: list[str] = Field(
        default_factory=lambda: ["GET", "POST", "OPTIONS"],
        description="Methods a preflight allows.",
    )
    allowed_headers: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Request headers a preflight allows (`*`: whatever the browser asks for).",
    )
    expose_headers: list[str] = Field(
        default_factory=lambda: [
            "X-Request-Id", "Retry-After", "X-Queue-Wait-Ms",
            "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
            "x-ratelimit-model_per_key-limit-requests",
            "x-ratelimit-model_per_key-remaining-requests",
            "x-ratelimit-model_per_key-reset-requests",
            "x-ratelimit-model_per_key-limit-tokens",
            "x-ratelimit-model_per_key-remaining-tokens",
            "x-ratelimit-model_per_key-reset-tokens",
        ],
        description="Response headers a page may read.",
    )  # fmt: skip
    max_age_seconds: int = Field(600, ge=0, description="How long a browser caches a preflight.")

    def allows(self, origin: str) -> bool:
        return bool(origin) and ("*" in self.allowed_origins or origin in self.allowed_origins)


class ServerConfig(Section):
    host: str = Field("127.0.0.1", description="Address the API listens on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the API (0 picks a free one).")
    admin_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="If set, a second listener on `admin_host` serves /health, /metrics and "
        "/ready without credentials; the public port then needs an admin principal for them.",
    )
    admin_host: str = Field(
        "127.0.0.1",
        description="Address of the admin listener. Keep it on loopback on a shared host; in "
        "a cluster, `0.0.0.0` lets kubelet probes and Prometheus reach it on the pod network "
        "(the admin port carries no credentials: keep it off any public network).",
    )
    public_metrics: bool = Field(
        False, description="Serve /metrics on the public port without credentials."
    )
    public_ready: bool = Field(
        False, description="Serve /ready on the public port without credentials."
    )
    heartbeat_seconds: float = Field(
        10.0, gt=0, description="SSE comment sent on a stream after this long with no output."
    )
    max_body_bytes: ByteSize = Field(
        ByteSize(4 * 1024 * 1024), gt=0, description="Largest request body accepted (413 above)."
    )
    body_read_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="A request body must arrive within this long once its headers have "
        "(408 after it); a client that declares a body and sends part of it holds nothing.",
    )
    header_read_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A request's line and headers must arrive within this long of the "
        "connection opening (its first request) or of their first byte (a later request on a "
        "keep-alive connection); then the connection is closed, with a 408 if part of a "
        "request came. An idle keep-alive connection is not timed by this.",
    )
    keepalive_timeout_seconds: float = Field(
        75.0,
        gt=0,
        description="An idle keep-alive connection (no request in progress) is closed after "
        "this long (nginx's default; aiohttp's own is an hour).",
    )
    max_messages: int = Field(
        2048,
        ge=1,
        description="Most chat `messages` (and Responses `input` items) one request may hold "
        "(400 `array_above_max_length` above).",
    )
    max_prompts: int = Field(
        1024,
        ge=1,
        description="Most prompts in one /v1/completions or /tokenize batch (`prompt` as a "
        "list; a list of token ids is one prompt); 400 `array_above_max_length` above.",
    )
    max_json_depth: int = Field(
        64,
        ge=2,
        le=128,
        description="Deepest nesting of arrays and objects in a request body, the body "
        "itself being level 1 (400 `request_too_complex` deeper).",
    )
    max_json_values: int = Field(
        262144,
        ge=16,
        description="Most values (array items and object members, at every level) in one "
        "request body (400 `request_too_complex` above): bounds what validating one request "
        "can cost. A prompt of token ids holds one value per token: the default leaves room "
        "for the longest contexts vLLM serves.",
    )
    json_thread_bytes: ByteSize = Field(
        ByteSize(64 * 1024),
        ge=0,
        description="Request bodies larger than this are parsed and checked on one worker "
        "thread instead of the event loop, so that a few huge bodies wait for each other, "
        "not every other request (set it to `max_body_bytes` to parse all on the loop).",
    )
    stall_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="A streaming client that accepts no data for this long is disconnected.",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="`auto`: uvloop when installed (it comes with vLLM), else asyncio."
    )
    gc_freeze: bool = Field(
        True,
        description="Once the engine has started, move every object that exists then out of the "
        "garbage collector's reach (`gc.freeze`), so its full passes scan only the objects of "
        "requests in flight, not the engine's and libraries' (pauses of tens of ms otherwise).",
    )
    gc_gen0_threshold: int = Field(
        1_000_000,
        ge=700,
        description="Net allocations of tracked objects that start an automatic young pass of "
        "the garbage collector (Python's default: 700). Each pass scans the objects of every "
        "request in flight (tens of ms under load); the request paths make no reference "
        "cycles, so passes are left to `gc_collect_seconds` and this is only a safety net. "
        "Applied once the engine has started (processes it starts keep Python's default).",
    )
    gc_collect_seconds: float = Field(
        60.0,
        ge=0,
        description="Run a full garbage collection this often, freeing reference cycles made by "
        "rare paths (library errors) within this time; 0 = only by `gc_gen0_threshold`.",
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT, how long in-flight requests may finish."
    )
    watch_config: bool = Field(
        False,
        description="Reload the config file when its content changes (read once a second), as "
        "`llmserve reload` does: same outcomes, log lines and metric. An edit that does not "
        "validate or needs a restart changes nothing and is reported once; a file replaced by "
        "rename or through a symlink (a Kubernetes ConfigMap) is followed; a file that goes "
        "missing changes nothing until it is back.",
    )
    cors: CorsConfig = Field(
        default_factory=CorsConfig, description="Browser access (CORS); off by default."
    )


class FakeEngineConfig(Section):
    ttft_seconds: float = Field(0.0, ge=0, description="Fake engine: delay before the first token.")
    tokens_per_second: float = Field(
        0.0, ge=0, description="Fake engine: output rate per request (0 = as fast as possible)."
    )
    output_tokens: int | None = Field(
        None,
        ge=1,
        description="Fake engine: stop naturally after this many tokens (unset = "
        "run to max_tokens).",
    )
    fail_before_first_token: bool = Field(
        False, description="Fake engine: every request fails before its first token."
    )
    fail_after_tokens: int | None = Field(
        None, ge=0, description="Fake engine: every request fails after this many tokens."
    )


class EngineNodesConfig(Section):
    nnodes: int = Field(
        1,
        ge=1,
        description="Nodes the engine spans with vLLM's multiprocess backend: node 0 runs "
        "`llmserve up`, each other node `llmserve worker` with the same file (docs/scaling.md). "
        "A Ray cluster is not counted here: with Ray, leave `engine.nodes` unset.",
    )
    node_rank: int = Field(
        0,
        ge=0,
        description="This node's index: 0 on the head (`llmserve up`), 1 to nnodes - 1 on the "
        "others (`llmserve worker --node-rank N` overrides it, as does `${NODE_RANK}`).",
    )
    master_addr: str | None = Field(
        None,
        description="The head node's address, reachable from every node (required when "
        "nnodes > 1): torch.distributed of replicas that span nodes, and the data-parallel "
        "handshake unless `data_parallel_address` is set.",
    )
    master_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="torch.distributed port on the head for replicas that span nodes (unset: "
        "vLLM's 29501).",
    )
    data_parallel_size_local: int | None = Field(
        None,
        ge=1,
        description="Data-parallel replicas on this node (unset: data_parallel_size / nnodes "
        "when nnodes > 1, else all of them). Below data_parallel_size without nnodes, the "
        "other replicas run on `llmserve worker` nodes.",
    )
    data_parallel_start_rank: int | None = Field(
        None,
        ge=0,
        description="First data-parallel rank of a worker node's replicas (workers only; the "
        "head has rank 0; unset: inferred from node_rank when nnodes > 1). `llmserve worker "
        "--data-parallel-start-rank` overrides it.",
    )
    data_parallel_address: str | None = Field(
        None,
        description="Address of the head's data-parallel handshake, as the other nodes reach "
        "it (unset: master_addr).",
    )
    data_parallel_rpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the head's data-parallel handshake (unset: vLLM's 29550).",
    )
    heartbeat_port: int = Field(
        29560,
        ge=1,
        le=65535,
        description="Port on the head (at data_parallel_address, else master_addr) where each "
        "`llmserve worker` keeps a heartbeat connection: a worker node that stops, or is "
        "silent for 10 s, makes the head's engine dead (503, exit 1) instead of leaving "
        "requests to hang (docs/scaling.md).",
    )


# LoRA ranks vLLM can serve (vllm.config.lora.MaxLoRARanks)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class LoraConfig(Section):
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters served next to the base model: `{name: path}` (a PEFT "
        "directory, or a hub id already in the local hub cache). Each name is a model of its "
        "own in `/v1/models` and in a request's `model` (docs/engine.md, LoRA adapters). A "
        "reload loads the entries added to the file and unloads those removed from it.",
    )
    max_loras: int | None = Field(
        None,
        ge=1,
        description="Adapters in one batch (vLLM's `max_loras`; unset: the number of adapters, "
        "at most 8). Requests for more adapters than this wait for a slot. Setting it turns "
        "LoRA on even without adapters, to load them at run time. On CPU it is also the most "
        "adapters the engine holds at once (at least the number of adapters), and vLLM gets "
        "one slot more (docs/engine.md, LoRA adapters and aliases).",
    )
    max_lora_rank: int | None = Field(
        None,
        description="Largest adapter rank (vLLM's `max_lora_rank`: 1, 8, 16, 32, 64, 128, 256, "
        "320 or 512; unset: the largest `r` of the adapters' adapter_config.json, rounded up).",
    )
    max_cpu_loras: int | None = Field(
        None,
        ge=1,
        description="Adapters kept in CPU memory (vLLM's `max_cpu_loras`; unset: max_loras); "
        "others are read from disk again when asked for.",
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_vllm_serves(cls, value: int | None) -> int | None:
        if value is not None and value not in LORA_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, LORA_RANKS))}")
        return value

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            check_model_name(name, "adapter name")
            if not path.strip():
                raise ValueError(f"{name}: the adapter's path is empty")
        return value

    @property
    def enabled(self) -> bool:
        """Whether the engine starts with LoRA on: adapters to serve, or slots for run time."""
        return bool(self.adapters) or self.max_loras is not None

    @property
    def batch_loras(self) -> int:
        """vLLM's max_loras: max_loras, or the number of adapters (1 to 8)."""
        return self.max_loras or max(1, min(len(self.adapters), 8))

    @model_validator(mode="after")
    def _cpu_loras_fit(self) -> LoraConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.batch_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                f"({self.batch_loras})"
            )
        return self


def check_model_name(name: str, what: str) -> None:
    """A name clients send as `model`: printable, no surrounding spaces, at most 256 chars."""
    if not name or name != name.strip() or len(name) > 256 or not name.isprintable():
        raise ValueError(f"{what} {name!r}: not a usable model name")


class EngineConfig(Section):
    kind: Literal["vllm", "fake"] = Field(
        "vllm", description="`vllm` (embedded vLLM) or `fake` (deterministic, for tests)."
    )
    model: str = Field(
        "./models/smollm2-135m-instruct", description="Model directory or hub id for vLLM."
    )
    served_model_name: str | None = Field(
        None, description="Name clients send as `model` (default: the model's directory name)."
    )
    max_model_len: int = Field(2048, ge=16, description="Context length: prompt + output tokens.")
    max_num_seqs: int = Field(16, ge=1, description="Sequences the engine runs in one batch.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` uses CUDA when a GPU is visible, else the CPU settings."
    )
    dtype: str = Field(
        "auto",
        description="Weights dtype passed to vLLM (auto, float32, bfloat16, ...). `auto` on CPU "
        "keeps the checkpoint's bfloat16 where the CPU computes it natively (AVX-512 BF16, AMX, "
        "Arm BF16), else float32 (3.5x faster there) when the float32 weights and the KV cache "
        "fit 60% of the memory available, else the checkpoint's dtype with a warning; on GPU "
        "it is vLLM's `auto`. `llmserve check` and the start-up log say what it chose.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica (vLLM TP).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages (vLLM PP).")
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="Engine replicas in this server (vLLM data parallel), each with "
        "`tensor_parallel_size` x `pipeline_parallel_size` devices; vLLM balances requests "
        "between them and admission allows `max_num_seqs` in flight per replica.",
    )
    data_parallel_backend: Literal["mp", "ray"] = Field(
        "mp", description="How vLLM runs the data-parallel replicas: processes, or Ray actors."
    )
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = Field(
        None,
        description="How vLLM runs the workers of one replica (`mp` processes, `ray`, `uni`: "
        "in the engine process). Unset: vLLM's choice (on CPU `uni`, `mp` when a replica "
        "has several workers).",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use (GPU only)."
    )
    cpu_kv_cache_bytes: Literal["auto"] | PositiveByteSize = Field(
        "auto",
        description="KV cache size on CPU (CPU only). `auto`: what `max_num_seqs` sequences of "
        "`max_model_len` tokens need at the dtype the engine runs (from the model's "
        "config.json), within a quarter of the memory available at start-up; 1GiB where the "
        "model's shape cannot be read. `llmserve check` shows the size.",
    )
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Output cap for requests without max_tokens (unset = the rest of the context).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM AsyncEngineArgs by name (checked at start)."
    )
    tool_call_parser: str | None = Field(
        None,
        description="vLLM tool-call parser for `tool_choice: auto` (`hermes`, `llama3_json`, "
        "`mistral`, `pythonic`, ... as `vllm serve --tool-call-parser`).",
    )
    enable_auto_tool_choice: bool = Field(
        False,
        description="Let the model decide to call tools (`tool_choice: auto`); needs "
        "`tool_call_parser` (as `vllm serve --enable-auto-tool-choice`).",
    )
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        "parameter",
        description="How far tool calls are constrained by structured outputs: `parameter` "
        "makes forced calls' arguments valid against the tool's schema (vLLM's default, "
        "`auto`, only when a tool says `strict: true`).",
    )
    reasoning_parser: str | None = Field(
        None,
        description="vLLM reasoning parser (`deepseek_r1`, `qwen3`, ...): the model's reasoning "
        "goes to `reasoning_content`, apart from `content`.",
    )
    chat_template: str | None = Field(
        None, description="A chat template (file or inline Jinja) instead of the model's own."
    )
    compact_json: bool = Field(
        True,
        description="Structured outputs (JSON schemas, forced tool calls) allow no free "
        "whitespace between tokens (vLLM's `disable_any_whitespace`): small models otherwise "
        "fill `max_tokens` with newlines.",
    )
    frontend_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra `vllm serve` frontend settings by name (e.g. "
        "`enable_prompt_tokens_details: true`), for requests vLLM's own handlers answer.",
    )
    nodes: EngineNodesConfig = Field(
        default_factory=EngineNodesConfig,
        description="An engine spread over several nodes with vLLM's multiprocess backend.",
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig,
        description="LoRA adapters served next to the base model (docs/engine.md).",
    )
    aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Other names of served models, `{alias: model}` (the base model's name or "
        "an adapter's), e.g. `{gpt-4o-mini: smollm2}`: a request for the alias runs the model "
        "and its response names the alias; `/v1/models` lists it too. A reload applies them.",
    )
    fake: FakeEngineConfig = Field(
        default_factory=FakeEngineConfig, description="Settings of the fake engine."
    )

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model.rstrip("/")).name

    @field_validator("cpu_kv_cache_bytes", mode="before")
    @classmethod
    def _kv_size(cls, value: object) -> object:
        """`auto` or a positive size, with one plain message for anything else."""
        if value == "auto":
            return value
        try:
            size = _BYTE_SIZE.validate_python(value)
        except ValidationError:
            raise ValueError("expected auto or a size such as 1GiB") from None
        if size <= 0:
            raise ValueError("expected auto or a size above 0")
        return size

    @model_validator(mode="after")
    def _auto_tools_need_parser(self) -> EngineConfig:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser")
        return self

    @model_validator(mode="after")
    def _model_names_unique(self) -> EngineConfig:
        base, adapters = self.model_name, self.lora.adapters
        if base in adapters:
            raise ValueError(f"lora.adapters.{base}: the base model's name, served_model_name")
        for alias, target in self.aliases.items():
            check_model_name(alias, "alias")
            if alias == base or alias in adapters:
                raise ValueError(f"aliases.{alias}: already the name of a served model")
            if target != base and target not in adapters:
                served = ", ".join([base, *adapters])
                raise ValueError(
                    f"aliases.{alias}: {target!r} is not a served model (the base model or an "
                    f"adapter of lora.adapters: {served})"
                )
        return self

    @model_validator(mode="after")
    def _nodes_fit(self) -> EngineConfig:
        nodes, dp = self.nodes, self.data_parallel_size
        if nodes.nnodes > 1:
            if "ray" in (self.data_parallel_backend, self.distributed_executor_backend):
                raise ValueError(
                    "nodes.nnodes > 1 runs vLLM's multiprocess backend; with Ray the Ray "
                    "cluster spans the nodes: leave engine.nodes unset"
                )
            if not nodes.master_addr:
                raise ValueError("nodes.master_addr: set the head node's address (nnodes > 1)")
            if nodes.node_rank >= nodes.nnodes:
                raise ValueError(
                    f"nodes.node_rank must be below nodes.nnodes ({nodes.nnodes}), "
                    f"got {nodes.node_rank}"
                )
            world = dp * self.tensor_parallel_size * self.pipeline_parallel_size
            if world % nodes.nnodes:
                raise ValueError(
                    f"nodes.nnodes ({nodes.nnodes}) must divide data_parallel_size x "
                    f"tensor_parallel_size x pipeline_parallel_size ({world})"
                )
        local = nodes.data_parallel_size_local
        if local is not None and local > dp:
            raise ValueError(
                f"nodes.data_parallel_size_local ({local}) is above data_parallel_size ({dp})"
            )
        start = nodes.data_parallel_start_rank
        if start is not None and start + max(local or 1, 1) > dp:
            raise ValueError(
                f"nodes.data_parallel_start_rank ({start}) + its local replicas exceed "
                f"data_parallel_size ({dp})"
            )
        remote = nodes.nnodes == 1 and local is not None and local < dp
        if remote and not (nodes.data_parallel_address or nodes.master_addr):
            raise ValueError(
                "nodes.data_parallel_address: set the head node's address (replicas run "
                "on other nodes: data_parallel_size_local < data_parallel_size)"
            )
        return self


JwtAlgorithm = Literal[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"
]
JWKS_MAX_REFRESH_SECONDS = 86400.0  # a JWKS is fetched again at least once a day


def _default_algorithms() -> list[JwtAlgorithm]:
    return ["HS256"]


class JwtConfig(Section):
    algorithms: list[JwtAlgorithm] = Field(
        default_factory=_default_algorithms, description="Accepted JWT algorithms (one family)."
    )
    secret: SecretStr | None = Field(
        None, description="HMAC secret for HS*; use `${LLMSERVE_JWT_SECRET}`, never a literal."
    )
    public_key_file: Path | None = Field(None, description="PEM public key for RS*/ES*/PS*.")
    private_key_file: Path | None = Field(
        None, description="PEM private key, only for `llmserve keys jwt` to mint test tokens."
    )
    jwks_file: Path | None = Field(None, description="A JWKS file of public keys (by `kid`).")
    jwks_url: str | None = Field(
        None,
        description="HTTPS URL of the identity provider's JWKS: fetched at start, refreshed in "
        "the background, refetched for an unknown `kid` (docs/auth.md).",
    )
    oidc_discovery: bool = Field(
        False,
        description="Take the JWKS URL (`jwks_uri`) from `{issuer}/.well-known/"
        "openid-configuration` instead of `jwks_url` (needs an https `issuer`).",
    )
    ca_file: Path | None = Field(
        None,
        description="PEM CA certificate(s) the JWKS and discovery servers must chain to, "
        "instead of the system's (an identity provider with a private CA); TLS is always "
        "verified.",
    )
    jwks_refresh_seconds: float = Field(
        300.0,
        ge=1,
        le=JWKS_MAX_REFRESH_SECONDS,
        description="How often the JWKS is fetched again when its response has no "
        "Cache-Control max-age (a max-age is followed, between jwks_min_refresh_seconds "
        "and 24 h).",
    )
    jwks_min_refresh_seconds: float = Field(
        60.0,
        ge=1,
        le=JWKS_MAX_REFRESH_SECONDS,
        description="Shortest time between two fetches of the JWKS whatever max-age says; also "
        "at most one refetch per this long for tokens naming an unknown `kid`.",
    )
    issuer: str | None = Field(None, description="Required `iss` claim, when set.")
    audience: str | None = Field(None, description="Required `aud` claim, when set.")
    leeway_seconds: float = Field(30.0, ge=0, description="Clock skew allowed for exp/nbf/iat.")
    subject_claim: str = Field("sub", description="Claim that gives the principal id.")
    tier_claim: str = Field("tier", description="Claim that gives the tier.")
    models_claim: str = Field("models", description="Claim listing allowed models (absent = all).")
    admin_claim: str | None = Field(
        None,
        description="Claim that, when `true`, makes the caller an admin (unset: JWTs never are).",
    )
    allowed_tiers: list[str] | None = Field(
        None,
        description="Tiers a token may claim (unset: any configured tier); bounds what an "
        "identity provider that lets users edit their claims can hand out.",
    )
    max_lifetime_seconds: float | None = Field(
        None,
        gt=0,
        description="Longest token lifetime accepted (`exp` - `iat`; `iat` then required); "
        "unset: any. Also how long `llmserve keys jwt-revoke` keeps a revocation by default "
        "(30 days when unset).",
    )

    @model_validator(mode="after")
    def _one_algorithm_family(self) -> JwtConfig:
        # Mixing HMAC with public-key algorithms is what algorithm-confusion attacks need.
        hmac_algs = [a for a in self.algorithms if a.startswith("HS")]
        if hmac_algs and len(hmac_algs) != len(self.algorithms):
            raise ValueError("algorithms: do not mix HS* with RS*/ES*/PS* (algorithm confusion)")
        if not self.algorithms:
            raise ValueError("algorithms: list at least one algorithm")
        secret = self.secret.get_secret_value() if self.secret is not None else None
        if hmac_algs and secret is not None and len(secret.encode()) < 32:
            raise ValueError(
                "secret: at least 32 bytes for HS* (a shorter HMAC secret can be brute-forced "
                "from one token)"
            )
        return self

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtConfig:
        # One source of verification keys: a leftover second one is a guess about which wins.
        sources = [name for name, present in (
            ("public_key_file", self.public_key_file is not None),
            ("jwks_file", self.jwks_file is not None),
            ("jwks_url", self.jwks_url is not None),
            ("oidc_discovery", self.oidc_discovery),
        ) if present]  # fmt: skip
        if any(a.startswith("HS") for a in self.algorithms):
            if sources:
                raise ValueError(
                    f"{sources[0]}: a key source for RS*/ES*/PS*/EdDSA, but algorithms are "
                    f"{self.algorithms} (verified with `secret`): set `algorithms` to the "
                    "identity provider's, e.g. [RS256], or remove it"
                )
        elif self.secret is not None:
            raise ValueError(
                "secret: only for HS* algorithms; RS*/ES*/PS*/EdDSA verify with one of "
                "public_key_file, jwks_file, jwks_url or oidc_discovery"
            )
        if len(sources) > 1:
            raise ValueError(
                f"{' and '.join(sources)}: set one source of verification keys, not "
                f"{len(sources)}"
            )
        if self.jwks_url is not None:
            _check_https_url(self.jwks_url, "jwks_url")
        if self.oidc_discovery:
            if not self.issuer:
                raise ValueError("oidc_discovery: needs `issuer`, the identity provider's URL")
            _check_https_url(self.issuer, "issuer (with oidc_discovery)")
        if self.ca_file is not None and self.jwks_url is None and not self.oidc_discovery:
            raise ValueError("ca_file: only for fetching keys (jwks_url or oidc_discovery)")
        if self.jwks_refresh_seconds < self.jwks_min_refresh_seconds:
            raise ValueError(
                f"jwks_refresh_seconds: at least jwks_min_refresh_seconds "
                f"({self.jwks_min_refresh_seconds:g})"
            )
        return self


def _check_https_url(url: str, setting: str) -> None:
    """Keys fetched over plain HTTP could be swapped by anyone on the path: https only."""
    parsed = urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise ValueError(f"{setting}: {url!r} is not an https:// URL (keys are fetched over TLS)")


class AuthConfig(Section):
    enabled: bool = Field(True, description="Require a principal on every route but /health.")
    keys: str | Path = Field(
        Path(".llmserve/keys"),
        description="Where API keys and JWT revocations are kept: a directory (one machine), "
        "or `redis://host:6379/0` (also `rediss://`, `unix://`, `redis+sentinel://`, "
        "`redis+cluster://`; options as `limits.store`) shared by every replica. See "
        "docs/auth.md.",
    )
    cache_seconds: float = Field(
        0.5,
        ge=0,
        le=1,
        description="How long an auth decision is cached in process (<= 1 s): bounds how long "
        "a replica accepts a key or JWT revoked through another replica or the CLI.",
    )
    stale_if_error_seconds: float = Field(
        30.0,
        ge=0,
        description="Key store unreachable (Redis down): a credential this replica decided "
        "within this long keeps that decision; any other gets 503 `auth_unavailable` with "
        "Retry-After (never a 401). 0: only decisions still within `cache_seconds`.",
    )
    jwt: JwtConfig | None = Field(None, description="Accept JWTs as well as API keys.")

    @field_validator("keys")
    @classmethod
    def _known_key_store(cls, value: str | Path) -> str | Path:
        from llmserve.auth.store_url import check_key_store_url

        try:
            check_key_store_url(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value


class WindowLimits(Section):
    requests_per_minute: int | None = Field(None, ge=1, description="Requests per minute.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Tokens per minute.")
    tokens_per_day: int | None = Field(None, ge=1, description="Tokens per UTC day.")
    tokens_per_month: int | None = Field(None, ge=1, description="Tokens per UTC month.")


class ShadowLimits(WindowLimits):
    pass


class ModelLimits(WindowLimits):
    pass


class TierConfig(WindowLimits):
    completion_token_weight: float = Field(
        1.0, gt=0, description="Each completion token counts as this many tokens."
    )
    default_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens reserved (and enforced) when a request sets none."
    )
    priority: int = Field(0, description="Higher is served first by the admission queue.")
    ttft_slo_seconds: float | None = Field(
        None,
        gt=0,
        description="Time to first token this tier is promised (default: "
        "queue.ttft_slo_seconds); see there.",
    )
    shadow: ShadowLimits | None = Field(
        None,
        description="Limits counted but never enforced: a request they would refuse is "
        "served, and counted in llmserve_limit_shadow_refusals_total{tier,window} and its "
        "ledger line's `shadow_refused`. To try a tighter tier on real traffic first.",
    )
    models: dict[str, ModelLimits] = Field(
        default_factory=dict,
        description="Windows per served model, `{model: {tokens_per_minute: ...}}`, enforced "
        "as well as the tier's own: a request needs room in both. An alias counts as the "
        "model it stands for; name that model here (docs/limits.md, Limits per model).",
    )

    @field_validator("models")
    @classmethod
    def _model_names_usable(cls, value: dict[str, ModelLimits]) -> dict[str, ModelLimits]:
        for name in value:
            check_model_name(name, "model")
        return value


class LimitsConfig(Section):
    store: str = Field(
        "memory://",
        description="`memory://` or a Redis URL: `redis://host:6379/0`, `rediss://` (TLS), "
        "`unix://`, `redis+sentinel://`, `redis+cluster://`; forms and options in "
        "docs/limits.md.",
    )
    on_store_error: Literal["closed", "open"] = Field(
        "closed", description="Store unreachable: `closed` answers 503, `open` admits and logs."
    )
    state_dir: Path = Field(
        Path(".llmserve/limits"), description="Where the memory store persists day/month usage."
    )
    default_tier: str = Field("default", description="Tier of principals that name none.")
    hold_lease_seconds: float = Field(
        30.0,
        ge=1,
        description="Redis store: a request's hold on its worst case is renewed by its server "
        "every third of this; when the server dies (a crash, a SIGKILL) its holds' tokens are "
        "refunded this long after their last renewal. Clocks of servers sharing a Redis must "
        "agree to well within it.",
    )
    tiers: dict[str, TierConfig] = Field(
        default_factory=lambda: {"default": TierConfig()}, description="Tiers by name."
    )

    @model_validator(mode="after")
    def _default_tier_exists(self) -> LimitsConfig:
        if self.default_tier not in self.tiers:
            raise ValueError(
                f"default_tier {self.default_tier!r} is not one of the tiers "
                f"({', '.join(sorted(self.tiers)) or 'none defined'})"
            )
        return self


class QueueConfig(Section):
    max_concurrency: int | None = Field(
        None,
        ge=1,
        description="Requests in the engine at once (default: engine.max_num_seqs x "
        "engine.data_parallel_size).",
    )
    max_depth: int = Field(64, ge=0, description="Requests waiting for a slot; beyond: 503.")
    max_wait_seconds: float = Field(30.0, gt=0, description="Longest wait for a slot; then 503.")
    max_queued_tokens: int | None = Field(
        None, ge=1, description="Optional cap on prompt+max_tokens of all waiting requests."
    )
    default_timeout_seconds: float | None = Field(
        None, gt=0, description="Deadline of a request without an X-Request-Timeout header."
    )
    ttft_slo_seconds: float | None = Field(
        10.0,
        gt=0,
        description="Time to first token promised to every tier that sets none: a request "
        "that would wait is admitted only if its predicted wait plus prefill fits this (and "
        "its deadline), else it gets 503 at once, with Retry-After; one still waiting when "
        "its first token could no longer come in time leaves with 503. null: no objective.",
    )
    reserved_share: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="With tiers of different priorities, this share of the engine slots and "
        "queue places is kept for the highest-priority tier while it is in use (a request "
        "of it in the last minute): a lower tier flooding the server cannot fill them.",
    )
    lower_prefills: int | Literal["auto"] | None = Field(
        "auto",
        description="With tiers of different priorities, while the highest is in use, at "
        "most this many requests of lower tiers are in their prefill at once (admitted, "
        "first token not yet out), and none starts during a top-tier prefill (docs/admission.md); "
        "the next waits in the queue. auto: 1 per engine (data-parallel rank) where the engine "
        "runs each prompt whole in one step (vLLM on CPU, no chunked prefill: prompts "
        "admitted together share the step a top-tier request waits for), no limit elsewhere "
        "(chunked prefill bounds a step). null: no limit.",
    )

    @field_validator("lower_prefills")
    @classmethod
    def _lower_prefills_positive(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1, auto, or null (no limit)")
        return value


class MetricsConfig(Section):
    per_key: bool = Field(True, description="Per-principal token and request counters.")
    max_principals: int = Field(
        1000, ge=1, description="Cap on distinct principal label values (the rest: `other`)."
    )


class UsageConfig(Section):
    ledger: Path | None = Field(
        Path(".llmserve/usage.jsonl"), description="Usage ledger file (JSON lines); null = off."
    )
    max_bytes: ByteSize = Field(
        ByteSize(64 * 1024 * 1024), gt=0, description="Rotate the ledger at this size."
    )
    backups: int = Field(5, ge=0, description="Rotated ledger files kept.")
    fsync_seconds: float = Field(
        1.0,
        ge=0,
        description="fsync the ledger at most this often (0 = after every record). Each record "
        "is written to the OS at once, so a server crash loses none; a power loss at most this "
        "window.",
    )


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["text", "json"] = Field("text", description="`text` or JSON lines.")
    access_log: bool = Field(True, description="One line per request with status and tokens.")


class Config(Section):
    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP server.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Model engine.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys and JWTs.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Rate limits.")
    queue: QueueConfig = Field(default_factory=QueueConfig, description="Admission queue.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus.")
    usage: UsageConfig = Field(default_factory=UsageConfig, description="Usage ledger.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logs.")

    @property
    def max_concurrency(self) -> int:
        engine = self.engine
        return self.queue.max_concurrency or engine.max_num_seqs * engine.data_parallel_size

    @model_validator(mode="after")
    def _model_limits_name_served_models(self) -> Config:
        problems, unknown = check_model_limits(self)
        if problems:
            raise ValueError("\n".join(problems))
        for warning in unknown:
            log.warning("%s", warning)
        return self


def check_model_limits(config: Config) -> tuple[list[str], list[str]]:
    """The tiers' per-model windows against the models the config serves: (errors, warnings).

    An entry must name the base model or an adapter, never an alias (it counts as its model).
    Any other name is an error when the engine runs without LoRA; with LoRA on, an adapter of
    that name may be loaded at run time (`llmserve models load`), which the config cannot
    know: a warning, and its windows apply once it is."""
    engine = config.engine
    # the fake engine is named "fake" unless served_model_name says otherwise (engine/fake.py)
    fake_default = engine.kind == "fake" and not engine.served_model_name
    served = ["fake" if fake_default else engine.model_name, *engine.lora.adapters]
    problems, unknown = [], []
    for tier_name, tier in config.limits.tiers.items():
        for model in tier.models:
            where = f"limits.tiers.{tier_name}.models.{model}"
            target = engine.aliases.get(model)
            if target is not None:
                problems.append(f"{where}: an alias of {target!r}, and an alias counts as the "
                                f"model it stands for: set these limits on {target!r}")  # fmt: skip
            elif model in served:
                continue
            elif engine.lora.enabled:
                unknown.append(f"{where}: not a model of the config ({', '.join(served)}); "
                               "its windows apply once an adapter of that name is loaded at "
                               "run time")  # fmt: skip
            else:
                problems.append(f"{where}: not a model this server serves (it serves "
                                f"{', '.join(served)})")  # fmt: skip
    return problems, unknown


# ---------------------------------------------------------------------------------------------
# Loading

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def resolve_config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """The file to load: the explicit one, else $LLMSERVE_CONFIG, else ./llmserve.yaml."""
    return Path(explicit or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_FILE)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, interpolate and validate a config file; raise ConfigError naming what is wrong."""
    file = resolve_config_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc.strerror}") from None
    return parse_config(text, source=str(file))


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_message(exc, source)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    data = _interpolate(data, source, ())
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, source)) from None


def _yaml_error_message(exc: yaml.YAMLError, source: str) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"{source}: invalid YAML: {problem}"
    return f"{source}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}"


def _interpolate(value: Any, source: str, path: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, source, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, source, (*path, str(i))) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        return _ENV_REFERENCE.sub(lambda m: _env_value(m, source, path), value)
    return value


def _env_value(match: re.Match[str], source: str, path: tuple[str, ...]) -> str:
    name, default = match.group(1), match.group(2)
    value = os.environ.get(name)
    if value is not None and value != "":
        return value
    if default is not None:
        return default
    raise ConfigError(
        f"{source}: {'.'.join(path)}: environment variable {name} is not set "
        f"(write ${{{name}:-default}} to give a default)"
    )


def _validation_message(exc: ValidationError, source: str) -> str:
    lines = [_describe_error(err, source) for err in exc.errors()]
    return "\n".join(dict.fromkeys(lines))


def _describe_error(err: Any, source: str) -> str:
    loc = [str(part) for part in err["loc"]]
    kind = err["type"]
    if kind == "extra_forbidden":
        where = ".".join(loc[:-1])
        known = _known_fields(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        prefix = f"{where}: " if where else ""
        expected = f"; expected one of: {', '.join(known)}" if known and not hint else ""
        return f"{source}: {prefix}unknown setting {loc[-1]!r}{suggestion}{expected}"
    dotted = ".".join(loc) or "<top level>"
    if not loc and kind == "value_error":  # a check across sections names its own settings
        return f"{source}: {err['msg'].removeprefix('Value error, ')}"
    if kind == "missing":
        return f"{source}: {dotted}: required setting is missing"
    message = err["msg"].replace("Input should be", "expected").replace("Value error, ", "")
    got = err.get("input")
    shown = ""
    if not isinstance(got, dict | list) and got is not None:
        shown = f" (got {mask_tree(got)!r})"  # a URL's password never appears
    return f"{source}: {dotted}: {message}{shown}"


def _known_fields(loc: list[str]) -> list[str]:
    current: Any = Config
    for i, part in enumerate(loc):
        if current is dict:
            # the mappings of sections: limits.tiers.<name> and its models.<model>
            current = ModelLimits if loc[i - 1] == "models" else TierConfig
        elif isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            current = _section_type(field.annotation) if field else None
        if current is None:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _section_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if getattr(annotation, "__origin__", None) is dict:
        return dict
    args = getattr(annotation, "__args__", ())
    for arg in args:
        found = _section_type(arg)
        if found is not None:
            return found
    return None


# Settings (dotted names; a trailing "." or "_" covers all those it starts) that only a restart
# can change: the engine and its model, the sockets, the stores and files opened at start, and
# what the process was tuned with. Everything else a reload applies (server/reload.py).
RESTART_ONLY = (
    "engine.",
    "server.host", "server.port", "server.admin_port", "server.admin_host",
    "server.event_loop", "server.gc_", "server.max_body_bytes",
    "server.header_read_timeout_seconds", "server.keepalive_timeout_seconds",
    "server.shutdown_grace_seconds", "server.watch_config",
    "limits.store", "limits.state_dir",
    "auth.enabled", "auth.keys",
    "usage.", "metrics.",
)  # fmt: skip


# Settings under a RESTART_ONLY prefix that a reload applies all the same (server/reload.py):
# the adapters and aliases served (engine/served.py loads and unloads them).
RELOADABLE = ("engine.lora.adapters", "engine.aliases")


def restart_only(setting: str) -> bool:
    """Whether changing this setting needs a restart (a reload refuses it)."""
    if any(setting == p or setting.startswith(p + ".") for p in RELOADABLE):
        return False
    return any(
        setting == p or (p.endswith((".", "_")) and setting.startswith(p)) for p in RESTART_ONLY
    )


def iter_settings(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (dotted name, FieldInfo) of the tree: used by docs/configuration.md and its test."""
    out: list[tuple[str, Any]] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _section_type(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out.extend(iter_settings(sub, f"{dotted}."))
        elif sub is dict and name == "tiers":
            out.append((dotted, field))
            out.extend(iter_settings(TierConfig, f"{dotted}.<name>."))
        elif sub is dict and model is TierConfig and name == "models":
            out.append((dotted, field))
            out.extend(iter_settings(ModelLimits, f"{dotted}.<model>."))
        else:
            out.append((dotted, field))
    return out


def effective_config(config: Config) -> dict[str, Any]:
    """The config as plain data with secrets masked (for `llmserve check`): SecretStr values,
    and the password of every URL (a Redis URL may carry one)."""
    masked: dict[str, Any] = mask_tree(config.model_dump(mode="json"))
    return masked
