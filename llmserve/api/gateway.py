"""The path of one generation request after validation: limits, admission, engine, response,
settlement. Handlers build a `Job`; `Gateway.run` does the rest, for chat and completions alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from llmserve.admission.protocol import Admission, AdmissionTicket
from llmserve.api import objects
from llmserve.api.models import resolve_model
from llmserve.api.schemas import ChatCompletionRequest, CompletionRequest
from llmserve.api.sse import Heartbeats, SSEStream
from llmserve.api.stream import StreamLifecycle
from llmserve.auth.principal import Principal
from llmserve.config import Config, TierConfig
from llmserve.engine.base import (
    Delta,
    Engine,
    EngineError,
    EngineUnavailable,
    Prompt,
    PromptTooLong,
    SamplingOptions,
)
from llmserve.engine.catalog import ServedModel
from llmserve.engine.served import ServedModels
from llmserve.errors import (
    APIError,
    ContextLengthExceeded,
    DeadlineExceeded,
    EngineFailed,
    PermissionDenied,
    ServiceUnavailable,
    retry_after_header,
    shutting_down,
)
from llmserve.limits.limiter import Reservation
from llmserve.limits.protocol import RateLimiter
from llmserve.records import RequestRecord
from llmserve.request_state import RECORD, STARTED

log = logging.getLogger("llmserve.gateway")

DEADLINE_HEADER = "X-Request-Timeout"
ENGINE_RETRY_SECONDS = 10  # Retry-After when the engine is down: a supervisor restart takes ~10s


@dataclass(slots=True)
class Job:
    """One generation request, validated and rendered, on its way to the engine."""

    chat: bool
    response_id: str
    model: str
    prompt: Prompt
    options: SamplingOptions
    principal: Principal
    tier: str
    root_model: str | None = None  # the model it runs (an alias's target): its limits apply
    stream: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    deadline: float | None = None  # monotonic (= loop) time after which the request is dropped
    # filled while it runs
    engine_started: bool = False
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)
    ticket: AdmissionTicket | None = None  # the engine slot, released once the engine is done


class Gateway:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        limiter: RateLimiter | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.models = ServedModels(engine, config.engine)  # the names served, changed at run time
        self.limiter = limiter
        self.admission = admission
        # a store that never yields (memory) needs no task to protect its calls from cancellation
        self._shield_limiter = limiter is not None and not limiter.never_suspends
        self.heartbeats = Heartbeats(
            config.server.heartbeat_seconds, config.server.stall_timeout_seconds
        )
        self.priority_scheduling = config.engine.options.get("scheduling_policy") == "priority"
        self.ready = False  # the engine has started
        self.force_stopping = False  # set when shutdown's grace time is over

    def reconfigure(self, config: Config) -> None:
        """A reloaded config (server/reload.py): requests that start from now on use it."""
        self.heartbeats = Heartbeats(
            config.server.heartbeat_seconds, config.server.stall_timeout_seconds
        )
        self.config = config

    # -- checks before anything is spent ----------------------------------------------------

    def check_model(self, model: str, principal: Principal) -> ServedModel:
        """The served model (base, LoRA adapter, or alias) `model` names; 404 model_not_found,
        or 403 model_not_allowed when the caller's allow-list does not cover it."""
        return resolve_model(self, model, principal)

    def check_engine(self) -> None:
        if not self.ready:
            raise ServiceUnavailable(
                "The model is still loading; retry shortly.",
                code="engine_unavailable",
                headers=retry_after_header(5),
            )
        if self.engine.dead is not None:
            raise ServiceUnavailable(
                "The model engine is unavailable; the server is restarting. Retry shortly.",
                code="engine_unavailable",
                headers=retry_after_header(ENGINE_RETRY_SECONDS),
            )

    def refuse_early(self, principal: Principal, tier_name: str) -> None:
        """Raise the 429 of a caller whose requests_per_minute is spent, before its body is read
        (limits/blocks.py)."""
        if self.limiter is not None:
            self.limiter.refuse_early(principal.id, tier_name, principal.limit_overrides)

    async def charge_refused_request(self, principal: Principal, tier_name: str | None) -> None:
        """Count a request refused before the limiter saw it against requests_per_minute (it
        costs no tokens); a caller already out of requests gets the 429 instead."""
        if self.limiter is None or tier_name is None:
            return
        reservation = await self.limiter.reserve(
            principal.id, tier_name, principal.limit_overrides, 0, 0
        )
        settlement = self.limiter.settlement(reservation, 0, 0)
        if settlement is not None:
            await self.limiter.apply(settlement)

    def tier_of(self, principal: Principal) -> tuple[str, TierConfig]:
        """The caller's tier; 403 unknown_tier when its credential names one the config does
        not define (never the default tier instead: that may be more generous)."""
        limits = self.config.limits
        name = principal.tier or limits.default_tier
        tier = limits.tiers.get(name)
        if tier is None:
            raise PermissionDenied(
                f"Your credentials name the rate-limit tier {name!r}, which this server does "
                "not define. Ask the operator to fix the key or the token.",
                code="unknown_tier",
            )
        return name, tier

    def sampling_options(
        self, params: ChatCompletionRequest | CompletionRequest, prompt: Prompt,
        tier: TierConfig, requested_max: int | None,
        default_max: int | None = None,
    ) -> SamplingOptions:  # fmt: skip
        param = "messages" if isinstance(params, ChatCompletionRequest) else "prompt"
        max_tokens = self._max_tokens(prompt, default_max or tier.default_max_tokens,
                                      requested_max, param)  # fmt: skip
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=params.stop_sequences,
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            top_k=params.top_k if params.top_k not in (None, 0) else None,
            ignore_eos=bool(params.ignore_eos),
            priority=tier.priority,
        )

    def default_max_tokens(self, tier_name: str, principal: Principal) -> int | None:
        """The tier's default max_tokens, with the key's own override when it has one."""
        if self.limiter is not None:
            plan = self.limiter.plan(tier_name, principal.limit_overrides)
            default: int | None = plan.default_max_tokens
            return default
        return self.config.limits.tiers[tier_name].default_max_tokens

    def _max_tokens(
        self, prompt: Prompt, tier_default: int | None, requested: int | None, param: str
    ) -> int:
        context = self.engine.max_model_len
        room = context - prompt.num_tokens
        default = tier_default or self.config.engine.default_max_tokens
        max_tokens = requested or (min(default, room) if default else room)
        if max_tokens < 1 or prompt.num_tokens + max_tokens > context:
            raise context_length_error(prompt.num_tokens, requested or 1, context, param)
        return max_tokens

    # -- running ---------------------------------------------------------------------------

    async def run(self, request: web.Request, job: Job) -> web.StreamResponse:
        record: RequestRecord = request[RECORD]
        reservation = await self.reserve(job)
        record.admitted = True
        record.shadow_refused = reservation.shadow_refused if reservation is not None else None
        headers = dict(getattr(reservation, "headers", None) or {})
        try:
            if job.stream:
                return await self._run_stream(request, job, headers)
            return await self._run_json(request, job, headers)
        except APIError as exc:
            exc.headers = {**headers, **exc.headers}
            raise
        except asyncio.CancelledError:
            if not self.force_stopping:
                raise  # the client went away
            _uncancel()
            raise shutting_down(cut_short=True) from None
        finally:
            # usage is what the engine really processed: nothing for a request refused before it
            record.prompt_tokens = job.prompt.num_tokens if job.engine_started else 0
            record.completion_tokens = job.completion_tokens
            record.finish_reason = job.finish_reason
            if reservation is not None:
                await self.settle(reservation, job)

    async def reserve(self, job: Job) -> Reservation | None:
        """Reserve against the limits; a client gone mid-reservation gets its tokens back.
        A request that could not start in time is refused first, uncharged."""
        self.refuse_if_too_late(job)
        if self.limiter is None:
            return None
        p = job.principal
        reserve = self.limiter.reserve(p.id, job.tier, p.limit_overrides, job.prompt.num_tokens,
                                       job.options.max_tokens, job.root_model)  # fmt: skip
        if not self._shield_limiter:
            return await reserve
        task = asyncio.ensure_future(reserve)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await _shielded(self._release_when_reserved(task))
            raise

    async def _release_when_reserved(self, task: asyncio.Future[Reservation]) -> None:
        assert self.limiter is not None
        with contextlib.suppress(Exception):
            reservation = await task
            await self.limiter.release(reservation)

    async def settle(self, reservation: Reservation, job: Job) -> None:
        assert self.limiter is not None  # a reservation comes from it
        prompt_tokens = job.prompt.num_tokens if job.engine_started else 0
        settlement = self.limiter.settlement(reservation, prompt_tokens, job.completion_tokens)
        if settlement is None:
            return  # nothing to tell the store: no task, no round trip
        if self._shield_limiter:
            await _shielded(self.limiter.apply(settlement))
        else:
            await self.limiter.apply(settlement)

    async def _run_json(
        self, request: web.Request, job: Job, headers: dict[str, str]
    ) -> web.Response:
        with _deadline(job):
            ticket = self.enqueue(job)
            try:
                if ticket is not None:
                    await self.wait_for_slot(request, ticket, None)
                async for delta in self._deltas(request, job):
                    if delta.text:
                        job.text.append(delta.text)
            finally:
                if ticket is not None:
                    ticket.release()
        waited = request[RECORD].queue_wait_seconds
        if waited is not None:
            headers["X-Queue-Wait-Ms"] = str(int(waited * 1000))
        body = objects.completion_json(
            chat=job.chat, response_id=job.response_id, created=job.created, model=job.model,
            text="".join(job.text), finish_reason=job.finish_reason,
            prompt_tokens=job.prompt.num_tokens, completion_tokens=job.completion_tokens,
        )  # fmt: skip
        return objects.json_bytes_response(body, headers=headers)

    async def _run_stream(
        self, request: web.Request, job: Job, headers: dict[str, str]
    ) -> web.StreamResponse:
        lifecycle = StreamLifecycle(request, self.heartbeats, headers, lambda: self.force_stopping)
        return await lifecycle.run(lambda sse: self._generate_stream(request, job, sse))

    async def _generate_stream(self, request: web.Request, job: Job, sse: SSEStream) -> None:
        with _deadline(job):
            ticket = self.enqueue(job)
            try:
                if ticket is not None:
                    await self.wait_for_slot(request, ticket, sse)
                await self._stream_deltas(request, job, sse)
            finally:
                if ticket is not None:
                    ticket.release()

    async def _stream_deltas(self, request: web.Request, job: Job, sse: SSEStream) -> None:
        encoder = objects.ChunkEncoder(
            chat=job.chat, response_id=job.response_id, created=job.created, model=job.model,
            include_usage=job.include_usage,
        )  # fmt: skip
        pending = encoder.role() if job.chat else b""
        async with contextlib.aclosing(self._deltas(request, job)) as deltas:
            async for delta in deltas:
                if delta.text:
                    await sse.send(pending + encoder.text(delta.text))
                    pending = b""
        # the engine request has ended (and given its slot back): now the rest of the stream
        tail = encoder.finish(job.finish_reason or "stop")
        if job.include_usage:
            tail += encoder.usage(job.prompt.num_tokens, job.completion_tokens)
        await sse.send(pending + tail + objects.DONE)
        await sse.drain()
        request[RECORD].delivered = True

    async def _deltas(self, request: web.Request, job: Job) -> AsyncGenerator[Delta, None]:
        """Engine deltas, with the timing and token accounting every response needs."""
        record: RequestRecord = request[RECORD]
        loop = asyncio.get_running_loop()
        t0: float = request[STARTED]
        gen = self.engine.generate(job.prompt, job.options, job.response_id)
        job.engine_started = True
        last: float | None = None
        try:
            while True:
                before = loop.time()
                try:
                    delta = await gen.__anext__()
                except StopAsyncIteration:
                    break
                except PromptTooLong as exc:
                    param = "messages" if job.chat else "prompt"
                    raise context_length_error(exc.num_tokens, job.options.max_tokens,
                                               exc.max_model_len, param) from None  # fmt: skip
                except EngineError as exc:
                    raise _engine_api_error(exc) from None
                now = loop.time()
                record.engine_seconds += now - before
                job.completion_tokens += delta.num_tokens
                if delta.finish_reason is not None:
                    job.finish_reason = delta.finish_reason
                if delta.num_tokens:
                    if last is None:
                        record.ttft_seconds = now - t0
                        if job.ticket is not None:
                            job.ticket.first_token()
                    else:
                        record.inter_token_seconds.append(now - last)
                    last = now
                yield delta
        finally:
            await gen.aclose()
            if job.ticket is not None:
                job.ticket.release()  # the engine is done: a slow reader must not hold the slot

    def enqueue(self, job: Job) -> AdmissionTicket | None:
        """Join the admission queue (None without one). The caller waits for the slot and
        releases it in a `finally`; `_deltas` releases it as soon as the engine is done."""
        if self.admission is None:
            return None
        job.ticket = self.admission.enqueue(
            job.options.priority, self._queue_cost(job), job.deadline,
            prompt_tokens=job.prompt.num_tokens, ttft_slo=self._ttft_slo(job),
        )  # fmt: skip
        return job.ticket

    def _ttft_slo(self, job: Job) -> float | None:
        tier = self.config.limits.tiers.get(job.tier) if job.tier else None
        own = tier.ttft_slo_seconds if tier is not None else None
        return own or self.config.queue.ttft_slo_seconds

    def refuse_if_too_late(self, job: Job) -> None:
        """503 at once, before anything is charged, for a request whose predicted time to
        first token exceeds its tier's objective or its deadline (admission/queue.py)."""
        if self.admission is not None:
            self.admission.refuse_early(job.options.priority, job.prompt.num_tokens,
                                        job.deadline, self._ttft_slo(job))  # fmt: skip

    async def wait_for_slot(
        self, request: web.Request, ticket: AdmissionTicket, sse: SSEStream | None
    ) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        if sse is not None:
            sse.comment = lambda: queued_comment(ticket)
        try:
            await ticket.wait()
        finally:
            waited = loop.time() - start
            request[RECORD].queue_wait_seconds = waited
            if sse is not None:
                sse.comment = lambda: "keep-alive"
                sse.set_header("X-Queue-Wait-Ms", str(int(waited * 1000)))

    @staticmethod
    def _queue_cost(job: Job) -> int:
        return job.prompt.num_tokens + job.options.max_tokens


def queued_comment(ticket: AdmissionTicket) -> str:
    """The heartbeat of a waiting stream: `queued position=3 eta_ms=1200` (eta once known)."""
    eta = ticket.eta_seconds
    text = f"queued position={ticket.position}"
    return text if eta is None else f"{text} eta_ms={int(eta * 1000)}"


def context_length_error(
    prompt_tokens: int, max_tokens: int, context: int, param: str = "messages"
) -> APIError:
    return ContextLengthExceeded(
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
        "completion). Please reduce the length of the prompt or of max_tokens.",
        param=param,
    )


def _engine_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, EngineUnavailable):
        return ServiceUnavailable(
            "The model engine is unavailable; retry shortly.",
            code="engine_unavailable",
            headers=retry_after_header(ENGINE_RETRY_SECONDS),
        )
    log.error("generation failed: %s", exc, exc_info=exc)
    return EngineFailed("The model failed while generating this response; please retry.")


@contextlib.contextmanager
def _deadline(job: Job) -> Iterator[None]:
    """End the request with 504 deadline_exceeded when the client's deadline passes, whether it
    is queued or generating (cancelling the task aborts the engine request)."""
    if job.deadline is None:
        yield
        return
    task = asyncio.current_task()
    assert task is not None
    expired = False
    cancelling_before = task.cancelling()

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_at(job.deadline, expire)
    try:
        yield
    except asyncio.CancelledError:
        if not expired or task.uncancel() > cancelling_before:
            raise  # not ours, or a disconnect came as well: that one wins
        raise DeadlineExceeded(
            f"The request did not finish within its deadline ({DEADLINE_HEADER}); "
            "allow more time or ask for fewer tokens."
        ) from None
    finally:
        handle.cancel()


def _uncancel() -> None:
    """Let a task that was cancelled to end it (shutdown) still write its answer."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def _shielded(coro: Coroutine[Any, Any, None]) -> None:
    """Run settlement to the end even if the request's task is cancelled meanwhile."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
    except Exception:
        log.exception("settling a request failed")
