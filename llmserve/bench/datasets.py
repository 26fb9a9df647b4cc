"""Prompts to send: synthetic random prompts or a ShareGPT-format JSON file.

Token counts without the model's tokenizer are approximations (see `approx_token_count` and
`_WORDS`); the report always uses the token counts the server returns in `usage`, so the
approximation only shapes the load, never the figures. With a tokenizer (`load_tokenizer`, a
local Hugging Face tokenizer directory) random prompts have exact lengths, as in vLLM.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmserve.bench.errors import BenchError

# Short, common lowercase words: each is a single token (with its leading space) in the
# byte-level BPE vocabularies of GPT-2, Llama, Qwen and SmolLM, and exactly one token for
# llmserve's fake engine (which counts whitespace-separated words). So a prompt of N of them
# is N tokens, give or take the first word and whatever the chat template adds.
_WORD_LIST = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their has been if more when "
    "will would who so no out up into do any your what can some time my may only other new "
    "about over such than them me these first also then most could made after year work "
    "well way two even back good day man use how our just see long make world still "
    "own last too might must old life under never place same great end part small number "
    "off always next light open city side land early far air"
)
_WORDS = tuple(_WORD_LIST.split())

# ShareGPT pruning, as in vLLM's `is_valid_sequence`.
_MIN_LEN, _MAX_PROMPT_LEN, _MAX_TOTAL_LEN = 4, 1024, 2048


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer that prompt building needs."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True, slots=True)
class SampleRequest:
    prompt: str
    prompt_len: int  # expected prompt tokens (replaced by the server's usage when reported)
    expected_output_len: int  # sent as max_tokens


def approx_token_count(text: str) -> int:
    """OpenAI's rule of thumb for English: about four characters per token."""
    return max(1, math.ceil(len(text) / 4))


def sample_lengths(
    rng: random.Random, num: int, mean: int, range_ratio: float, minimum: int
) -> list[int]:
    """Integer-uniform lengths in [mean*(1-r), mean*(1+r)], as vLLM's random dataset draws."""
    if not 0.0 <= range_ratio < 1.0:
        raise BenchError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(minimum, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(num)]


def random_requests(
    num: int,
    input_len: int,
    output_len: int,
    *,
    seed: int = 0,
    range_ratio: float = 0.0,
    tokenizer: Tokenizer | None = None,
) -> list[SampleRequest]:
    if input_len < 1 or output_len < 1:
        raise BenchError("--input-len and --output-len must be at least 1")
    rng = random.Random(seed)
    input_lens = sample_lengths(rng, num, input_len, range_ratio, 1)
    output_lens = sample_lengths(rng, num, output_len, range_ratio, 1)
    requests = []
    for index, (in_len, out_len) in enumerate(zip(input_lens, output_lens, strict=True)):
        if tokenizer is None:
            prompt, prompt_len = " ".join(rng.choices(_WORDS, k=in_len)), in_len
        else:
            prompt, prompt_len = _exact_prompt(tokenizer, rng.randrange(1 << 30) + index, in_len)
        requests.append(SampleRequest(prompt, prompt_len, out_len))
    return requests


def _exact_prompt(tokenizer: Tokenizer, offset: int, length: int) -> tuple[str, int]:
    """vLLM's method: consecutive vocabulary ids, decoded, re-encoded and cut to length."""
    allowed = _allowed_ids(tokenizer)
    ids = [allowed[(offset + i) % len(allowed)] for i in range(length)]
    ids = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)[:length]
    prompt = tokenizer.decode(ids)
    return prompt, len(tokenizer.encode(prompt, add_special_tokens=False))


def _allowed_ids(tokenizer: Any) -> list[int]:
    cached = getattr(tokenizer, "_llmserve_bench_allowed", None)
    if cached is None:
        special = set(getattr(tokenizer, "all_special_ids", []))
        cached = [i for i in range(tokenizer.vocab_size) if i not in special]
        tokenizer._llmserve_bench_allowed = cached
    return cached


def sharegpt_requests(
    path: Path,
    num: int,
    *,
    seed: int = 0,
    output_len: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> list[SampleRequest]:
    """The first human turn as prompt, the reply's length as max_tokens (vLLM's sampling)."""
    entries = [e for e in _load_json_list(path) if len(e.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(entries)
    count = _counter(tokenizer)
    requests: list[SampleRequest] = []
    for entry in entries:
        if len(requests) >= num:
            break
        prompt = str(entry["conversations"][0].get("value", ""))
        reply = str(entry["conversations"][1].get("value", ""))
        prompt_len = count(prompt)
        out_len = count(reply) if output_len is None else output_len
        if _valid_sequence(prompt_len, out_len, check_output=output_len is None):
            requests.append(SampleRequest(prompt, prompt_len, out_len))
    if not requests:
        raise BenchError(f"{path}: no usable conversation (need two turns of 4..1024 tokens)")
    # Too few conversations for --num-prompts: repeat them, as vLLM oversamples.
    return [requests[i % len(requests)] for i in range(num)]


def _counter(tokenizer: Tokenizer | None) -> Any:
    if tokenizer is None:
        return approx_token_count
    return lambda text: len(tokenizer.encode(text))


def _valid_sequence(prompt_len: int, output_len: int, *, check_output: bool) -> bool:
    too_short = prompt_len < _MIN_LEN or (check_output and output_len < _MIN_LEN)
    too_long = prompt_len > _MAX_PROMPT_LEN or prompt_len + output_len > _MAX_TOTAL_LEN
    return not (too_short or too_long)


def _load_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchError(f"--dataset-path {path}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"--dataset-path {path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, list):
        raise BenchError(f"--dataset-path {path}: expected a JSON list of conversations")
    return [e for e in data if isinstance(e, dict)]


def load_tokenizer(path: str) -> Tokenizer:
    """A local Hugging Face tokenizer; needs `transformers` (imported only here)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise BenchError("--tokenizer needs the `transformers` package") from None
    try:
        tokenizer: Tokenizer = AutoTokenizer.from_pretrained(path)
        return tokenizer
    except (OSError, ValueError) as exc:
        raise BenchError(f"--tokenizer {path}: cannot load a tokenizer ({exc})") from None
