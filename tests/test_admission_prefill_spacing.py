"""While the top tier is in use, lower tiers' prefills start one at a time and wait for a
top-tier prefill in progress (queue.lower_prefills): on an engine that runs each prompt whole
in one step, the step a top-tier request shares then holds at most one other prompt."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from llmserve.admission import AdmissionQueue
from llmserve.clock import ManualClock
from llmserve.config import Config
from llmserve.engine.fake import FakeEngine
from tests.support.api import chat_body, make_config


def make_queue(clock: ManualClock, **kwargs: object) -> AdmissionQueue:
    settings: dict[str, object] = {"max_concurrency": 8, "max_depth": 8, "max_wait_seconds": 60.0,
                                   "top_priority": 10, "lower_prefills": 1}  # fmt: skip
    settings.update(kwargs)
    return AdmissionQueue(**settings, clock=clock, auto_expire=False)  # type: ignore[arg-type]


def top_tier_seen(queue: AdmissionQueue) -> None:
    ticket = queue.enqueue(priority=10)
    ticket.first_token()
    ticket.release()


async def test_lower_tiers_start_their_prefills_one_at_a_time_while_the_top_tier_is_in_use():
    clock = ManualClock()
    queue = make_queue(clock)
    top_tier_seen(queue)
    clock.advance(1.0)
    first, second, third = (queue.enqueue(priority=0) for _ in range(3))
    assert first.admitted and not second.admitted and not third.admitted  # slots are free
    assert queue.predict(0, 100).wait_seconds > 0  # a newcomer is told it would wait too
    first.first_token()  # its prefill is over: the next one starts, and only it
    assert second.admitted and not third.admitted
    second.release()  # ended before its first token (an error, a client gone): same
    assert third.admitted
    assert queue.in_flight == 2
    first.release()
    third.release()


async def test_a_top_tier_prefill_holds_lower_prefills_back_until_its_first_token():
    queue = make_queue(ManualClock())
    low = queue.enqueue(priority=0)
    assert low.admitted
    top = queue.enqueue(priority=10)
    assert top.admitted  # the top tier never waits for a lower tier's prefill
    low.first_token()
    waiting = queue.enqueue(priority=0)
    assert not waiting.admitted  # no lower prompt joins the top tier's prefill step
    top.first_token()
    assert waiting.admitted
    for ticket in (low, top, waiting):
        ticket.release()


async def test_lower_prefills_are_not_spaced_without_top_tier_traffic():
    clock = ManualClock()
    queue = make_queue(clock)
    early = [queue.enqueue(priority=0) for _ in range(4)]
    assert all(t.admitted for t in early)  # the top tier has not been seen
    for ticket in early:
        ticket.release()
    top_tier_seen(queue)
    clock.advance(61)  # a minute without it: no more spacing
    late = [queue.enqueue(priority=0) for _ in range(4)]
    assert all(t.admitted for t in late)
    for ticket in late:
        ticket.release()


async def test_without_a_limit_lower_prefills_start_together():
    queue = make_queue(ManualClock(), lower_prefills=None)
    top_tier_seen(queue)
    together = [queue.enqueue(priority=0) for _ in range(4)]
    assert all(t.admitted for t in together)
    for ticket in together:
        ticket.release()


def two_tier_config(**queue: object) -> Config:
    return Config.model_validate({
        "engine": {"kind": "fake", "max_num_seqs": 8},
        "limits": {"default_tier": "free", "tiers": {"free": {}, "pro": {"priority": 10}}},
        "queue": queue,
    })  # fmt: skip


def test_auto_spaces_lower_prefills_only_on_an_engine_that_runs_whole_prompts():
    queue = AdmissionQueue.from_config(two_tier_config())
    assert queue.lower_prefills is None  # before the engine says how it steps
    queue.engine_started(two_tier_config(), whole_prompt_steps=True)  # vLLM on CPU
    assert queue.lower_prefills == 1
    queue.reconfigure(two_tier_config(max_depth=16))  # a reload keeps the engine's answer
    assert queue.lower_prefills == 1
    queue.engine_started(two_tier_config(), whole_prompt_steps=False)  # chunked prefill
    assert queue.lower_prefills is None
    explicit = AdmissionQueue.from_config(two_tier_config(lower_prefills=3))
    assert explicit.lower_prefills == 3
    explicit.engine_started(two_tier_config(lower_prefills=3), whole_prompt_steps=True)
    assert explicit.lower_prefills == 3
    off = two_tier_config(lower_prefills=None)
    queue.engine_started(off, whole_prompt_steps=True)
    assert queue.lower_prefills is None
    two_engines = Config.model_validate({
        **two_tier_config().model_dump(exclude={"engine"}),
        "engine": {"kind": "fake", "max_num_seqs": 8, "data_parallel_size": 2},
    })  # fmt: skip
    queue.engine_started(two_engines, whole_prompt_steps=True)
    assert queue.lower_prefills == 2  # one prefill at a time per engine


@pytest.mark.parametrize("value", [0, -1, "some"])
def test_lower_prefills_must_be_positive_auto_or_null(value):
    with pytest.raises(ValidationError, match="lower_prefills"):
        two_tier_config(lower_prefills=value)


async def test_over_http_each_lower_tier_request_waits_for_the_previous_first_token(
    app_client, tmp_path
):
    config = make_config(tmp_path, queue={"lower_prefills": 1})
    engine = FakeEngine("fake", 256, ttft_seconds=0.2, tokens_per_second=20)
    queue = AdmissionQueue(8, 8, 30, top_priority=10, lower_prefills=1)
    top_tier_seen(queue)  # the anonymous caller's tier has priority 0: below it
    client = await app_client(config, engine, admission=queue)
    replies = await asyncio.gather(*(
        client.post("/v1/chat/completions", json=chat_body(max_tokens=2)) for _ in range(3)
    ))  # fmt: skip
    assert [r.status for r in replies] == [200, 200, 200]
    waits = sorted(int(r.headers["X-Queue-Wait-Ms"]) for r in replies)
    # each waited for the first token of the one before it (0.2 s each), though slots were free
    assert waits[1] >= 180 and waits[2] >= 360
    assert len(engine.calls) == 3


class WholePromptEngine(FakeEngine):
    whole_prompt_steps = True  # as vLLM on CPU says once started


async def test_the_server_settles_auto_from_the_engine_it_started(app_client, tmp_path):
    config = make_config(tmp_path)  # queue.lower_prefills: auto, the default
    queue = AdmissionQueue.from_config(config)
    assert queue.lower_prefills is None
    await app_client(config, WholePromptEngine("fake", 256), admission=queue)
    assert queue.lower_prefills == 1


async def test_overlapping_top_tier_prefills_cannot_starve_the_lower_tiers():
    queue = make_queue(ManualClock())
    tops = [queue.enqueue(priority=10), queue.enqueue(priority=10)]
    low = queue.enqueue(priority=0)
    assert not low.admitted
    for _ in range(3):  # the top tier keeps one prefill running at all times
        tops.append(queue.enqueue(priority=10))
        tops[-3].first_token()
        if low.admitted:
            break
    assert low.admitted  # the first top prefill to end let it start beside the others
    held = queue.enqueue(priority=0)
    low.first_token()
    assert not held.admitted  # one per top prefill that ends, not all of them
    tops[-2].first_token()
    assert held.admitted
    for ticket in (*tops, low, held):
        ticket.release()


async def test_a_lone_top_tier_prefill_ending_gives_no_pass_to_a_later_one():
    queue = make_queue(ManualClock())
    first = queue.enqueue(priority=10)
    first.first_token()  # nothing else was prefilling
    second = queue.enqueue(priority=10)
    low = queue.enqueue(priority=0)
    assert not low.admitted  # the second top prefill holds it back as the first did
    second.first_token()
    assert low.admitted
    for ticket in (first, second, low):
        ticket.release()


async def test_a_prefill_the_engine_will_not_report_ends_when_predicted_and_teaches_nothing():
    queue = AdmissionQueue(8, 8, 30, top_priority=10, lower_prefills=1)
    for _ in range(4):  # the prefill model learns: 128-token prompts take 0.05 s
        ticket = queue.enqueue(priority=10, prompt_tokens=128)
        queue._prefill.observe(128, 0.05)
        ticket.release()
    learned = queue.predict(10, 128).prefill_seconds
    quiet = queue.enqueue(priority=0, prompt_tokens=128)
    quiet.first_token_unseen()  # vLLM's non-streaming output: nothing until the end
    waiting = queue.enqueue(priority=0, prompt_tokens=128)
    assert quiet.admitted and not waiting.admitted
    await asyncio.sleep(learned + 0.2)
    assert waiting.admitted  # the quiet one's prefill was taken as over when predicted
    assert queue.predict(10, 128).prefill_seconds == pytest.approx(learned)
    for ticket in (quiet, waiting):
        ticket.release()


async def test_non_streaming_generations_through_vllms_handlers_say_their_first_token_is_unseen():
    from types import SimpleNamespace

    from llmserve.engine.vllm_frontend import _GATE, GatedEngineClient

    events: list[str] = []

    class Pass:
        engine_priority = 0

        def on_tokens(self, num_tokens: int) -> None:
            events.append(f"tokens {num_tokens}")

        def first_token_unseen(self) -> None:
            events.append("unseen")

        def on_finish(self, finish_reason: str | None) -> None:
            events.append(f"finish {finish_reason}")

        def on_rejected(self) -> None:
            events.append("rejected")

        async def close(self) -> None:
            events.append("closed")

    class Gate:
        async def enter(self, prompt_tokens: int, max_tokens: int, n: int, priority: int) -> Pass:
            return Pass()

    class Engine:  # vLLM's AsyncLLM as its handlers use it: one output, at the end
        async def generate(self, prompt, params, request_id, **kwargs):  # type: ignore[no-untyped-def]
            events.append("engine")
            completion = SimpleNamespace(index=0, token_ids=[1, 2, 3], finish_reason="stop")
            yield SimpleNamespace(outputs=[completion])

    client = GatedEngineClient(Engine(), (), SimpleNamespace(), KeyError)  # type: ignore[arg-type]
    token = _GATE.set(Gate())  # type: ignore[arg-type]
    try:
        for kind in ("FINAL_ONLY", "DELTA"):
            params = SimpleNamespace(n=1, max_tokens=3, output_kind=SimpleNamespace(name=kind))
            async for _ in client.generate({"prompt_token_ids": [1, 2]}, params, "r"):
                pass
            events.append("-")
    finally:
        _GATE.reset(token)
    assert events == ["unseen", "engine", "tokens 3", "finish stop", "closed", "-",
                      "engine", "tokens 3", "finish stop", "closed", "-"]  # fmt: skip
