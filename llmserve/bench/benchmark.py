"""A whole `llmserve bench`: options in, vLLM-shaped result dict(s) out. No printing here."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.bench import datasets, report
from llmserve.bench.arrivals import arrival_offsets
from llmserve.bench.client import COMPLETIONS_ENDPOINT, Target, first_model
from llmserve.bench.errors import BenchError
from llmserve.bench.records import RequestResult
from llmserve.bench.runner import run_load
from llmserve.bench.sweep import SweepOutcome, SweepStep, step_from_result, sweep

METRIC_NAMES = tuple(name for name, _, _ in report.METRICS)


@dataclass(frozen=True, slots=True)
class BenchOptions:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    endpoint: str = COMPLETIONS_ENDPOINT
    api_keys: tuple[str, ...] = ()
    dataset_name: str = "random"
    dataset_path: Path | None = None
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    sharegpt_output_len: int | None = None
    tokenizer: str | None = None
    num_prompts: int = 1000
    seed: int = 0
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    goodput_slo_ms: dict[str, float] = field(default_factory=dict)
    percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl")
    percentiles: tuple[float, ...] = (99.0,)
    label: str | None = None
    save_detailed: bool = False
    lora_modules: tuple[str, ...] = ()  # models drawn per request (vLLM's --lora-modules)


def parse_csv_metrics(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise BenchError(f"--percentile-metrics: unknown {unknown}; known: {list(METRIC_NAMES)}")
    return names


def parse_csv_percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise BenchError(f"--metric-percentiles {text!r}: expected numbers like 50,90,99") from None
    if not values or any(not 0 < p <= 100 for p in values):
        raise BenchError(f"--metric-percentiles {text!r}: each must be in (0, 100]")
    return values


def build_samples(options: BenchOptions) -> list[datasets.SampleRequest]:
    tokenizer = datasets.load_tokenizer(options.tokenizer) if options.tokenizer else None
    if options.dataset_name == "random":
        return datasets.random_requests(
            options.num_prompts,
            options.input_len,
            options.output_len,
            seed=options.seed,
            range_ratio=options.range_ratio,
            tokenizer=tokenizer,
        )
    if options.dataset_name == "sharegpt":
        if options.dataset_path is None:
            raise BenchError("--dataset-name sharegpt needs --dataset-path FILE.json")
        return datasets.sharegpt_requests(
            options.dataset_path,
            options.num_prompts,
            seed=options.seed,
            output_len=options.sharegpt_output_len,
            tokenizer=tokenizer,
        )
    raise BenchError(f"--dataset-name {options.dataset_name!r}: expected random or sharegpt")


async def resolve_model(options: BenchOptions) -> BenchOptions:
    """Fill in --model from GET /v1/models when it was not given (as vLLM does)."""
    if options.model:
        return options
    key = options.api_keys[0] if options.api_keys else None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            model = await first_model(session, options.base_url, key)
    except (TimeoutError, aiohttp.ClientError, KeyError, IndexError) as exc:
        raise BenchError(f"no --model given and GET /v1/models failed: {exc}") from None
    return replace(options, model=model)


async def run_once(
    options: BenchOptions,
    samples: list[datasets.SampleRequest],
    *,
    stop: asyncio.Event,
    on_result: Callable[[RequestResult], None] | None = None,
) -> dict[str, Any]:
    """One run at `options.request_rate`; returns vLLM's result dict plus the `llmserve` key."""
    offsets = arrival_offsets(
        len(samples), options.request_rate, options.burstiness, random.Random(options.seed)
    )
    outcome = await run_load(
        _target(options),
        samples,
        offsets,
        max_concurrency=options.max_concurrency,
        stop=stop,
        on_result=on_result,
    )
    return report.build_result(
        _settings(options),
        outcome.results,
        outcome.duration,
        interrupted=outcome.interrupted,
        detailed=options.save_detailed,
    )


async def run_sweep(
    options: BenchOptions,
    samples: list[datasets.SampleRequest],
    *,
    start_rate: float,
    factor: float,
    max_steps: int,
    min_good_fraction: float,
    stop: asyncio.Event,
    on_step: Callable[[float], Callable[[RequestResult], None] | None] = lambda rate: None,
) -> SweepOutcome:
    async def step(rate: float) -> SweepStep | None:
        result = await run_once(
            replace(options, request_rate=rate), samples, stop=stop, on_result=on_step(rate)
        )
        return None if result["llmserve"]["interrupted"] else step_from_result(rate, result)

    return await sweep(
        step,
        start_rate=start_rate,
        factor=factor,
        max_steps=max_steps,
        min_good_fraction=min_good_fraction,
    )


def _target(options: BenchOptions) -> Target:
    return Target(
        base_url=options.base_url,
        model=options.model or "",
        endpoint=options.endpoint,
        api_keys=options.api_keys,
        ignore_eos=options.ignore_eos,
        extra_body=options.extra_body,
        lora_modules=options.lora_modules,
    )


def _settings(options: BenchOptions) -> report.RunSettings:
    return report.RunSettings(
        model_id=options.model or "",
        endpoint=options.endpoint,
        num_prompts=options.num_prompts,
        request_rate=options.request_rate,
        burstiness=options.burstiness,
        max_concurrency=options.max_concurrency,
        percentile_metrics=options.percentile_metrics,
        percentiles=options.percentiles,
        goodput_slo_ms=options.goodput_slo_ms,
        tokenizer_id=options.tokenizer,
        label=options.label,
        base_url=options.base_url,
        api_keys=len(options.api_keys),
    )
