"""The gateway's controls for requests that the engine's own OpenAI frontend answers.

vLLM's request handlers start the engine generations themselves (one per request, one per prompt
of a batch completion, several for a Responses API turn with tools). Each generation enters
the request's `RequestGate` with its exact prompt length, `max_tokens` and `n`: it reserves
`prompt + n x max_tokens` against the caller's limits, waits for an engine slot in the admission
queue, and, when it ends, settles what the engine really processed and gives the slot back.
The request record (metrics, ledger) adds up every generation of the request.

A refusal is raised into vLLM's code (which may wrap or swallow it) and kept here:
`raise_refusal` raises it in the handler, so the client gets the gateway's own 429/503/504.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from llmserve.api.gateway import Gateway, Job
from llmserve.api.sse import SSEStream
from llmserve.auth.principal import Principal
from llmserve.engine.base import Prompt, SamplingOptions
from llmserve.errors import APIError, InvalidRequest
from llmserve.limits.limiter import Reservation
from llmserve.records import RequestRecord
from llmserve.request_state import RECORD, STARTED


@dataclass(slots=True)
class Caller:
    """Who a gated request runs for, and under which tier and deadline."""

    principal: Principal
    tier: str
    priority: int  # the tier's admission priority (higher is served first)
    deadline: float | None = None  # loop time
    route: str = "chat"


class RequestGate:
    """`GenerationGate` of one HTTP request (see the module docstring)."""

    def __init__(self, gateway: Gateway, request: web.Request, caller: Caller) -> None:
        self._gateway = gateway
        self._request = request
        self._caller = caller
        self._record: RequestRecord = request[RECORD]
        self._refusal: APIError | None = None
        self._open: list[GenerationPass] = []
        self.sse: SSEStream | None = None  # set by a streaming handler: heartbeats while queued
        self.headers: dict[str, str] = {}  # x-ratelimit-* of the last reservation
        self.entered = 0  # generations that got past the gate
        self._last_token: float | None = None

    @property
    def deadline(self) -> float | None:
        return self._caller.deadline

    async def enter(
        self, prompt_tokens: int, max_tokens: int, n: int, requested_priority: int
    ) -> GenerationPass:
        try:
            return await self._enter(prompt_tokens, max_tokens, n, requested_priority)
        except APIError as exc:
            self._refusal = exc
            raise

    async def _enter(
        self, prompt_tokens: int, max_tokens: int, n: int, requested_priority: int
    ) -> GenerationPass:
        job = self._job(prompt_tokens, max_tokens * max(1, n))
        reservation = await self._gateway.reserve(job)
        self._record.admitted = True
        if reservation is not None and reservation.shadow_refused:
            self._record.shadow_refused = reservation.shadow_refused
        headers = reservation.headers if reservation is not None else {}
        self.headers.update(headers)
        if self.sse is not None:
            for name, value in headers.items():
                self.sse.set_header(name, value)
        gate_pass = GenerationPass(self, job, reservation, requested_priority)
        ticket = self._gateway.enqueue(job)
        try:
            if ticket is not None:
                await self._gateway.wait_for_slot(self._request, ticket, self.sse)
        except BaseException:
            await gate_pass.close()
            raise
        self._open.append(gate_pass)
        self.entered += 1
        gate_pass.begin()
        return gate_pass

    def _job(self, prompt_tokens: int, max_tokens: int) -> Job:
        caller = self._caller
        return Job(
            chat=caller.route == "chat",
            response_id=self._record.request_id,
            model=self._record.model or "",
            prompt=Prompt(text=None, token_ids=None, num_tokens=prompt_tokens),
            options=SamplingOptions(max_tokens=max_tokens, priority=caller.priority),
            principal=caller.principal,
            tier=caller.tier,
            root_model=self._record.root_model,
            deadline=caller.deadline,
        )

    def engine_priority(self, requested: int) -> int:
        """vLLM's priority (lower first): the request may lower its urgency within its tier,
        never raise it above the tier's. 0 when the engine does not schedule by priority."""
        if not self._gateway.priority_scheduling:
            return 0
        return max(-self._caller.priority, requested)

    def record_tokens(self, count: int) -> None:
        record = self._record
        now = asyncio.get_running_loop().time()
        if record.ttft_seconds is None:
            record.ttft_seconds = now - self._request[STARTED]
        elif self._last_token is not None:
            record.inter_token_seconds.append(now - self._last_token)
        self._last_token = now
        record.completion_tokens += count

    def closed(self, gate_pass: GenerationPass) -> None:
        if gate_pass in self._open:
            self._open.remove(gate_pass)
        record = self._record
        if gate_pass.engine_started:
            record.prompt_tokens += gate_pass.job.prompt.num_tokens
        if gate_pass.finish_reason is not None:
            record.finish_reason = gate_pass.finish_reason
        record.engine_seconds += gate_pass.engine_seconds

    async def close(self) -> None:
        """Settle every generation still open (its engine request was cut short)."""
        self._refusal = None  # never kept past the request (it would hold its traceback)
        while self._open:
            await self._open[-1].close()

    def raise_refusal(self) -> None:
        """Raise the gate's refusal, if a generation was refused (and forget it)."""
        refusal, self._refusal = self._refusal, None
        if refusal is not None:
            raise refusal


@dataclass(eq=False, slots=True)
class GenerationPass:
    """One generation admitted by a `RequestGate` (`GatePass`)."""

    gate: RequestGate
    job: Job
    reservation: Reservation | None
    requested_priority: int
    engine_started: bool = False
    finish_reason: str | None = None
    first_token_seen: bool = True  # False: the engine reports only at the end
    engine_seconds: float = 0.0
    _began: float = field(default=0.0)
    _closed: bool = False

    def begin(self) -> None:
        self.job.engine_started = self.engine_started = True
        self._began = time.perf_counter()

    @property
    def engine_priority(self) -> int:
        return self.gate.engine_priority(self.requested_priority)

    def on_tokens(self, num_tokens: int) -> None:
        ticket = self.job.ticket
        if not self.job.completion_tokens and num_tokens and ticket and self.first_token_seen:
            ticket.first_token()
        self.job.completion_tokens += num_tokens
        self.gate.record_tokens(num_tokens)

    def first_token_unseen(self) -> None:
        self.first_token_seen = False
        if self.job.ticket is not None:
            self.job.ticket.first_token_unseen()

    def on_finish(self, finish_reason: str | None) -> None:
        if finish_reason is not None:
            self.finish_reason = finish_reason

    def on_rejected(self) -> None:
        """The engine refused the generation before running it: its prompt costs nothing."""
        if not self.job.completion_tokens:
            self.job.engine_started = self.engine_started = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._began:
            self.engine_seconds = time.perf_counter() - self._began
        ticket = self.job.ticket
        if ticket is not None:
            ticket.release()
        self.gate.closed(self)
        if self.reservation is not None:
            await self.gate._gateway.settle(self.reservation, self.job)


def bounded_metadata(value: object) -> dict[str, str] | None:
    """OpenAI's `metadata`: at most 16 string pairs, keys up to 64 and values up to 512
    characters (OpenAI's own bounds); it goes to the usage ledger."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16:
        raise InvalidRequest(
            "Invalid value for 'metadata': expected an object of at most 16 string pairs.",
            param="metadata",
        )
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > 64 or len(item) > 512:
            raise InvalidRequest(
                "Invalid value for 'metadata': keys are strings of up to 64 characters, "
                "values strings of up to 512.",
                param="metadata",
            )
    return dict(value)
