"""`llmserve bench`: load-test an OpenAI-compatible server, reported like `vllm bench serve`."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmserve.bench import report, stats
from llmserve.bench.benchmark import (
    BenchOptions,
    build_samples,
    parse_csv_metrics,
    parse_csv_percentiles,
    resolve_model,
    run_once,
    run_sweep,
)
from llmserve.bench.errors import BenchError
from llmserve.bench.records import RequestResult
from llmserve.bench.sweep import SweepOutcome

_err = Console(stderr=True)


def _names(values: list[str]) -> tuple[str, ...]:
    """`a,b` and repeated options alike."""
    return tuple(name.strip() for value in values for name in value.split(",") if name.strip())


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


def bench(
    base_url: str = typer.Option("http://127.0.0.1:8000", "--base-url", help="Server URL."),
    model: str = typer.Option(None, "--model", help="Model name (default: first of /v1/models)."),
    endpoint: str = typer.Option(
        "/v1/completions", "--endpoint", help="/v1/completions or /v1/chat/completions."
    ),
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="API key; repeat to spread requests round-robin over several principals "
            "(default: $OPENAI_API_KEY).",
        ),
    ] = None,
    dataset_name: str = typer.Option("random", "--dataset-name", help="random or sharegpt."),
    dataset_path: Annotated[
        Path | None, typer.Option("--dataset-path", help="ShareGPT-format JSON file.")
    ] = None,
    input_len: int = typer.Option(1024, "--input-len", "--random-input-len", help="Prompt tokens."),
    output_len: int = typer.Option(
        128, "--output-len", "--random-output-len", help="max_tokens of each request."
    ),
    range_ratio: float = typer.Option(
        0.0, "--random-range-ratio", help="Lengths uniform within len*(1±r)."
    ),
    sharegpt_output_len: int = typer.Option(
        None, "--sharegpt-output-len", help="Override the ShareGPT reply length."
    ),
    tokenizer: str = typer.Option(
        None, "--tokenizer", help="Local HF tokenizer dir: exact random prompt lengths."
    ),
    num_prompts: int = typer.Option(1000, "--num-prompts", min=1, help="Requests to send."),
    seed: int = typer.Option(0, "--seed", help="Seed of prompts and arrivals."),
    request_rate: float = typer.Option(
        float("inf"), "--request-rate", help="Requests/s (inf: all at once)."
    ),
    burstiness: float = typer.Option(
        1.0, "--burstiness", help="Gamma shape of arrivals: 1 Poisson, <1 burstier."
    ),
    max_concurrency: int = typer.Option(
        None, "--max-concurrency", min=1, help="Most requests in flight."
    ),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Send ignore_eos (vLLM field)."),
    temperature: float = typer.Option(None, "--temperature", help="Sampling temperature."),
    goodput: Annotated[
        list[str] | None,
        typer.Option(
            "--goodput", help="SLO as NAME:MS (ttft, tpot, e2el); repeat or space-separate."
        ),
    ] = None,
    percentile_metrics: str = typer.Option(
        report.DEFAULT_PERCENTILE_METRICS, "--percentile-metrics", help="e.g. ttft,tpot,itl,e2el"
    ),
    metric_percentiles: str = typer.Option(
        report.DEFAULT_METRIC_PERCENTILES, "--metric-percentiles", help="e.g. 50,90,99"
    ),
    save_result: bool = typer.Option(False, "--save-result", help="Write the result JSON."),
    result_dir: Annotated[
        Path | None, typer.Option("--result-dir", help="Folder of the result JSON.")
    ] = None,
    result_filename: str = typer.Option(None, "--result-filename", help="Result file name."),
    save_detailed: bool = typer.Option(False, "--save-detailed", help="Keep per-request lists."),
    label: str = typer.Option(None, "--label", help="Prefix of the result file name."),
    disable_tqdm: bool = typer.Option(False, "--disable-tqdm", help="No progress bar."),
    lora_modules: Annotated[
        list[str] | None,
        typer.Option(
            "--lora-modules",
            help="Model names drawn at random per request instead of --model (LoRA adapters, "
            "the base model, aliases), comma-separated or repeated, as vLLM's --lora-modules.",
        ),
    ] = None,
    sweep: bool = typer.Option(False, "--sweep", help="Raise the rate until goodput plateaus."),
    sweep_start_rate: float = typer.Option(1.0, "--sweep-start-rate", help="First rate (req/s)."),
    sweep_factor: float = typer.Option(2.0, "--sweep-factor", help="Rate multiplier per step."),
    sweep_steps: int = typer.Option(8, "--sweep-steps", min=1, help="Most steps."),
    sweep_min_good: float = typer.Option(
        0.9, "--sweep-min-good", help="A step passes when this fraction of requests met --goodput."
    ),
) -> None:
    """Load-test a server; the figures and result JSON match `vllm bench serve`.

    Exits 0 when at least one request succeeded, 1 when none did, 2 on a bad option.
    """
    try:
        options = BenchOptions(
            base_url=base_url,
            model=model,
            endpoint=endpoint,
            api_keys=_api_keys(api_key),
            dataset_name=dataset_name,
            dataset_path=dataset_path,
            input_len=input_len,
            output_len=output_len,
            range_ratio=range_ratio,
            sharegpt_output_len=sharegpt_output_len,
            tokenizer=tokenizer,
            num_prompts=num_prompts,
            seed=seed,
            request_rate=request_rate,
            burstiness=burstiness,
            max_concurrency=max_concurrency,
            ignore_eos=ignore_eos,
            extra_body={} if temperature is None else {"temperature": temperature},
            goodput_slo_ms=_goodput(goodput),
            percentile_metrics=parse_csv_metrics(percentile_metrics),
            percentiles=parse_csv_percentiles(metric_percentiles),
            label=label,
            save_detailed=save_detailed,
            lora_modules=_names(lora_modules or []),
        )
        _check_rates(options, sweep, sweep_factor)
        samples = build_samples(options)
        options = asyncio.run(resolve_model(options))
    except BenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if sweep:
        sweep_args = (sweep_start_rate, sweep_factor, sweep_steps, sweep_min_good)
        result = asyncio.run(_sweep(options, samples, sweep_args, disable_tqdm))
    else:
        result = asyncio.run(_once(options, samples, disable_tqdm))
        typer.echo(report.format_console(result))
    if save_result:
        path = report.result_path(result, result_dir=result_dir, filename=result_filename)
        report.write_result(result, path)
        typer.echo(f"result written to {path}")
    if not result.get("completed"):
        # Exit non-zero so a script or CI notices a run where nothing worked.
        typer.echo("error: no request succeeded (see the status counts above)", err=True)
        raise typer.Exit(1)


def _api_keys(given: list[str] | None) -> tuple[str, ...]:
    if given:
        return tuple(given)
    env = os.environ.get("OPENAI_API_KEY")
    return (env,) if env else ()


def _goodput(given: list[str] | None) -> dict[str, float]:
    pairs = [p for item in given or [] for p in item.replace(",", " ").split()]
    try:
        return stats.parse_goodput(pairs)
    except ValueError as exc:
        raise BenchError(str(exc)) from None


def _check_rates(options: BenchOptions, sweep: bool, factor: float) -> None:
    if options.request_rate <= 0 or options.burstiness <= 0:
        raise BenchError("--request-rate and --burstiness must be positive")
    if sweep and factor <= 1:
        raise BenchError("--sweep-factor must be greater than 1")


@contextlib.contextmanager
def _stop_on_ctrl_c(stop: asyncio.Event) -> Iterator[None]:
    """First Ctrl-C stops the run and reports; a second one kills it as usual."""
    loop = asyncio.get_running_loop()

    def first_interrupt() -> None:
        _err.print("[yellow]stopping: reporting the requests that completed[/]")
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, first_interrupt)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _progress(disabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ok {task.fields[ok]} failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=_err,
        disable=disabled,
        transient=False,
    )


def _tracker(progress: Progress, description: str, total: int) -> Callable[[RequestResult], None]:
    task = progress.add_task(description, total=total, ok=0, failed=0)
    counts = {"ok": 0, "failed": 0}

    def on_result(result: RequestResult) -> None:
        counts["ok" if result.success else "failed"] += 1
        progress.update(task, advance=1, ok=counts["ok"], failed=counts["failed"])

    return on_result


async def _once(options: BenchOptions, samples: list[Any], quiet: bool) -> dict[str, Any]:
    stop = asyncio.Event()
    rate = "inf" if math.isinf(options.request_rate) else f"{options.request_rate:g}"
    with _stop_on_ctrl_c(stop), _progress(quiet) as progress:
        track = _tracker(progress, f"{rate} req/s", len(samples))
        return await run_once(options, samples, stop=stop, on_result=track)


async def _sweep(
    options: BenchOptions,
    samples: list[Any],
    sweep_args: tuple[float, float, int, float],
    quiet: bool,
) -> dict[str, Any]:
    start_rate, factor, max_steps, min_good = sweep_args
    stop = asyncio.Event()
    with _stop_on_ctrl_c(stop), _progress(quiet) as progress:
        outcome = await run_sweep(
            options,
            samples,
            start_rate=start_rate,
            factor=factor,
            max_steps=max_steps,
            min_good_fraction=min_good,
            stop=stop,
            on_step=lambda rate: _tracker(progress, f"{rate:g} req/s", len(samples)),
        )
    typer.echo(_format_sweep(outcome))
    return _sweep_result(outcome)


def _sweep_result(outcome: SweepOutcome) -> dict[str, Any]:
    """The best step's result (else the last), with the whole sweep under llmserve.sweep."""
    chosen = [s for s in outcome.steps if s.rate == outcome.best_rate] or outcome.steps[-1:]
    result: dict[str, Any] = dict(chosen[0].result) if chosen else {"llmserve": {}}
    result["llmserve"] = {**result["llmserve"], "sweep": outcome.summary()}
    return result


def _format_sweep(outcome: SweepOutcome) -> str:
    lines = ["{s:{c}^{n}}".format(s=" Sweep ", n=50, c="=")]
    lines.append(f"{'rate (req/s)':>12} {'throughput':>11} {'goodput':>9} {'failed':>7}")
    for s in outcome.steps:
        lines.append(
            f"{s.rate:>12g} {s.request_throughput:>11.2f} {s.request_goodput:>9.2f} {s.failed:>7}"
        )
    best = "none met the SLO" if outcome.best_rate is None else f"{outcome.best_rate:g} req/s"
    lines += [f"Stopped: {outcome.stop_reason}", f"Highest rate meeting the SLO: {best}"]
    lines.append("=" * 50)
    return "\n".join(lines)
