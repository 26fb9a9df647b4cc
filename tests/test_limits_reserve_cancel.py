"""A client that goes away while its reservation is on the way back from a remote store
(Redis: the script ran, the reply is in flight) gets the whole hold refunded."""

from __future__ import annotations

import asyncio

from llmserve.app_state import LIFECYCLE
from llmserve.engine.fake import FakeEngine
from llmserve.limits import Limiter, store_from_url
from tests.support.api import chat_body, make_config


class SlowReplyStore:
    """The memory store, with the reply of reserve arriving after a network round trip."""

    def __init__(self, inner, reply_seconds: float) -> None:
        self.inner, self.reply_seconds = inner, reply_seconds
        self.reserved = asyncio.Event()

    leases = False

    async def reserve(self, principal_id, hold):
        outcome = await self.inner.reserve(principal_id, hold)  # applied "in Redis"
        self.reserved.set()
        await asyncio.sleep(self.reply_seconds)  # the reply on its way back
        return outcome

    async def settle(self, principal_id, hold, actual, now):
        await self.inner.settle(principal_id, hold, actual, now)

    async def renew(self, holds, until):
        return None

    async def peek(self, principal_id, charges, now):
        return await self.inner.peek(principal_id, charges, now)

    async def close(self):
        await self.inner.close()


async def test_disconnect_during_reserve_round_trip_refunds_the_hold(app_client, tmp_path):
    config = make_config(tmp_path, limits={
        "default_tier": "t", "tiers": {"t": {"tokens_per_day": 100_000}}})  # fmt: skip
    store = SlowReplyStore(store_from_url("memory://", tmp_path / "l"), reply_seconds=0.2)
    limiter = Limiter(config.limits, store)
    client = await app_client(config, FakeEngine("fake", 4096), limiter=limiter)
    request = asyncio.ensure_future(
        client.post("/v1/chat/completions", json=chat_body(max_tokens=1000))
    )
    await asyncio.wait_for(store.reserved.wait(), 5)
    request.cancel()  # the client disconnects while the reply is in flight
    assert await client.app[LIFECYCLE].wait_idle(5)  # the handler has ended (and settled)
    windows = await limiter.usage("anonymous", "t", {})
    used = next(w.used for w in windows if w.name == "tokens_per_day")
    assert used == 0, f"{used} tokens stay held for a request that never ran"
    await limiter.close()
