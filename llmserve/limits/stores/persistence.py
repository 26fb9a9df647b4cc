"""Whether a Redis server keeps a copy of its data: the start-up check of both Redis stores.

A Redis with neither RDB snapshots (`save`) nor an append-only file (`appendonly yes`) comes
back empty after a restart: the limiter's store (`limits.store`) loses day and month usage,
the key store (`auth.keys`) every API key and JWT revocation. Both stores ask the same way
(CONFIG GET) and word the warning for what they keep. Where CONFIG is refused (an ACL user
without it, a managed Redis that renames it) or the server does not answer, nothing can be
told: one INFO line says so, and the check returns no warning. A server that persists gets
one DEBUG line.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

from llmserve.limits.stores.resp import RedisClient, RespError, RespFailure

log = logging.getLogger("llmserve.redis")


@runtime_checkable
class ChecksPersistence(Protocol):
    """A store kept in Redis (RedisStore, RedisKeyStore): the server start-up asks it once."""

    async def persistence_warning(self) -> str | None:
        """What a restart of its server would lose, or None (it persists, or cannot be told)."""
        ...


async def persistence_warning(
    client: RedisClient, setting: str, loses: str, docs: str
) -> str | None:
    """The warning for a server with no persistence: `setting` names the store (`auth.keys`),
    `loses` what a restart does (`loses every API key`), `docs` where to read more."""
    try:
        save, appendonly = await client.call_many(
            [("CONFIG", "GET", "save"), ("CONFIG", "GET", "appendonly")]
        )
    except (RespFailure, OSError) as exc:
        why = "CONFIG GET refused" if isinstance(exc, RespError) else "no answer"
        log.info(
            "%s: could not check whether the Redis server at %s persists its data (%s: %s); "
            "make sure it runs with `appendonly yes`",
            setting, client.where, why, exc,
        )  # fmt: skip
        return None
    if _config_value(save) or _config_value(appendonly) == "yes":
        log.debug("%s: the Redis server at %s persists its data", setting, client.where)
        return None
    return (
        f"{setting}: the Redis server at {client.where} has no persistence (no RDB `save`, "
        f"`appendonly no`): a restart {loses}. Set `appendonly yes` (or a `save` schedule) on "
        f"it; see {docs}."
    )


def _config_value(reply: Any) -> str:
    """The value of a CONFIG GET reply ([name, value]), as text ("" when absent)."""
    if not isinstance(reply, list) or len(reply) < 2:
        return ""
    value = reply[1]
    return value.decode() if isinstance(value, bytes) else str(value)
