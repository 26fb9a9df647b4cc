"""API keys and JWT revocations in Redis, shared by every replica (`auth.keys: redis://...`).

Three hashes under the key prefix (default `llmserve:auth:`), the same records as the
directory store (auth/keys.py), hashes and metadata only, never a secret:

    <prefix>keys         key id -> the record as JSON (`key_hash` is sha256 of the key)
    <prefix>last_used    key id -> epoch seconds of the last use (written once a minute)
    <prefix>jwt_revoked  "sub:<subject>" / "jti:<token id>" -> "<revoked_at> <until>"

The request path reads one hash field per decision: `HGET keys <id>` for an API key, one
`HMGET jwt_revoked sub:<s> jti:<j>` for a JWT; each is one round trip, and the authenticator
caches the decision for `auth.cache_seconds`. Writes that change a record (revoke, rotate) are
compare-and-set scripts, so two replicas or CLIs writing at once never lose a revocation;
last-use times keep the latest value. Each command touches one key, so this also works on a
Redis Cluster.

The client is the limiter's (limits/stores/resp.py): one pipelined connection, reconnecting on
the next call after a failure; the same Sentinel and Cluster URLs work (limits/stores/urls.py).
Every failure surfaces as KeyStoreUnavailable.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from llmserve.auth.keys import (
    DUMMY_RECORD_JSON,
    ID_HEX_DIGITS,
    ImportCount,
    JwtRevocation,
    KeyNotFound,
    KeyRecord,
    KeyStoreUnavailable,
    decode_record,
    encode_record,
    hash_key,
    new_key,
    parse_key_id,
)
from llmserve.limits.stores.persistence import persistence_warning
from llmserve.limits.stores.resp import (
    RedisClient,
    RespArg,
    RespFailure,
    Script,
    client_from_url,
)

DEFAULT_KEY_PREFIX = "llmserve:auth:"
_CAS_ATTEMPTS = 16  # compare-and-set retries before giving up (only under a write storm)

# Replace a record only if it is still the one that was read.
_COMPARE_AND_SET = Script(
    """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""
)

# Field/value pairs set where the stored number is lower or absent (last-use times).
_SET_IF_LATER = Script(
    """
for i = 1, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]))
  if current == nil or current < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 0
"""
)

# A JWT revocation merged with the one in force for the same field (the later time and end
# win), then entries past their end dropped. Returns the stored value.
_REVOKE_JWT = Script(
    """
local field, at, till, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local old = redis.call('HGET', KEYS[1], field)
if old then
  local old_at, old_till = string.match(old, '^(%S+) (%S+)$')
  if old_till and tonumber(old_till) > now then
    if tonumber(old_at) > tonumber(at) then at = old_at end
    if tonumber(old_till) > tonumber(till) then till = old_till end
  end
end
redis.call('HSET', KEYS[1], field, at .. ' ' .. till)
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local _, ends = string.match(all[i + 1], '^(%S+) (%S+)$')
  if ends == nil or tonumber(ends) <= now then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return at .. ' ' .. till
"""
)


def _text(value: Any) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else None


class RedisKeyStore:
    """KeyStoreBackend in Redis (see the module docstring for the layout)."""

    def __init__(
        self,
        client: RedisClient,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self._keys = key_prefix + "keys"
        self._last_used = key_prefix + "last_used"
        self._jwt = key_prefix + "jwt_revoked"
        self._now = now

    @classmethod
    def from_url(cls, url: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> RedisKeyStore:
        """URL forms and query options: limits/stores/urls.py (one server, Sentinel,
        Cluster)."""
        return cls(client_from_url(url), key_prefix)

    @property
    def where(self) -> str:
        return f"redis at {self.client.where}"

    # -- the request path ---------------------------------------------------------------------

    async def lookup(self, api_key: str) -> KeyRecord | None:
        key_id = parse_key_id(api_key)
        if key_id is None:
            return None
        raw = _text(await self._call("HGET", self._keys, key_id))
        # Unknown ids and wrong secrets take the same path: a record is decoded and compared.
        record = decode_record(raw if raw is not None else DUMMY_RECORD_JSON)
        matches = hmac.compare_digest(record.key_hash, hash_key(api_key))
        return record if matches and raw is not None else None

    async def jwt_revocations(self, subject: str, token_id: str | None) -> list[JwtRevocation]:
        fields = [f"sub:{subject}"] + ([f"jti:{token_id}"] if token_id is not None else [])
        values = await self._call("HMGET", self._jwt, *fields)
        now = self._now()
        found = []
        for stored_field, value in zip(fields, values, strict=True):
            text = _text(value)
            entry = JwtRevocation.decode(stored_field, text) if text is not None else None
            if entry is not None and entry.active(now):
                found.append(entry)
        return found

    async def touch(self, last_used: dict[str, float]) -> None:
        if not last_used:
            return
        args: list[RespArg] = []
        for key_id, when in last_used.items():
            args += [key_id, repr(float(when))]
        await self._eval(_SET_IF_LATER, [self._last_used], args)

    # -- `llmserve keys` -----------------------------------------------------------------------

    async def get(self, key_id: str) -> KeyRecord:
        raw, when = await self._call_many(
            [("HGET", self._keys, key_id), ("HGET", self._last_used, key_id)]
        )
        text = _text(raw)
        if text is None:
            raise KeyNotFound(f"no key with id {key_id!r}")
        return _with_last_used(decode_record(text), _text(when))

    async def list_keys(self) -> list[KeyRecord]:
        records, times = await self._call_many(
            [("HGETALL", self._keys), ("HGETALL", self._last_used)]
        )
        last_used = _pairs(times)
        found = [
            _with_last_used(decode_record(raw), last_used.get(key_id))
            for key_id, raw in _pairs(records).items()
        ]
        return sorted(found, key=lambda r: (r.created, r.id))

    async def create(
        self,
        name: str,
        *,
        tier: str | None = None,
        models: Iterable[str] | None = None,
        expires: float | None = None,
        admin: bool = False,
        limits: dict[str, int] | None = None,
    ) -> tuple[KeyRecord, str]:
        while True:
            key_id = secrets.token_hex(ID_HEX_DIGITS // 2)
            api_key = new_key(key_id)
            record = KeyRecord(
                id=key_id,
                name=name,
                key_hash=hash_key(api_key),
                tier=tier,
                models=tuple(models) if models is not None else None,
                created=self._now(),
                expires=expires,
                admin=admin,
                limits=dict(limits or {}),
            )
            if await self._call("HSETNX", self._keys, key_id, encode_record(record)) == 1:
                return record, api_key

    async def revoke(self, key_id: str) -> KeyRecord:
        def revoked(record: KeyRecord) -> KeyRecord | None:
            return replace(record, revoked=self._now()) if record.revoked is None else None

        record, _ = await self._update(key_id, revoked)
        return record

    async def rotate(self, key_id: str) -> tuple[KeyRecord, str]:
        api_key = new_key(key_id)
        record, _ = await self._update(key_id, lambda r: replace(r, key_hash=hash_key(api_key)))
        return record, api_key

    async def put_records(
        self, records: Iterable[KeyRecord], *, replace: bool = False
    ) -> ImportCount:
        records = list(records)
        count = ImportCount()
        if not records:
            return count
        verb = "HSET" if replace else "HSETNX"
        replies = await self._call_many(
            [(verb, self._keys, r.id, encode_record(r)) for r in records]
        )
        written: dict[str, float] = {}
        for record, reply in zip(records, replies, strict=True):
            if replace:
                count.added += reply == 1
                count.replaced += reply == 0
            elif reply == 1:
                count.added += 1
            else:
                count.kept += 1
            if (replace or reply == 1) and record.last_used is not None:
                written[record.id] = record.last_used
        await self.touch(written)
        return count

    async def revoke_jwt(self, revocation: JwtRevocation) -> JwtRevocation:
        args: list[RespArg] = [
            revocation.field, repr(revocation.revoked_at), repr(revocation.until),
            repr(self._now()),
        ]  # fmt: skip
        stored = _text(await self._eval(_REVOKE_JWT, [self._jwt], args))
        merged = JwtRevocation.decode(revocation.field, stored or "")
        return merged if merged is not None else revocation

    async def list_jwt_revocations(self) -> list[JwtRevocation]:
        now = self._now()
        found = []
        for stored_field, value in _pairs(await self._call("HGETALL", self._jwt)).items():
            entry = JwtRevocation.decode(stored_field, value)
            if entry is not None and entry.active(now):
                found.append(entry)
        return sorted(found, key=lambda r: (r.revoked_at, r.field))

    async def persistence_warning(self) -> str | None:
        """What a restart of a Redis server that keeps no copy of its data costs (every key
        lost); None when it persists or cannot be told (limits/stores/persistence.py)."""
        return await persistence_warning(
            self.client, "auth.keys", "loses every API key and JWT revocation", "docs/auth.md"
        )

    async def close(self) -> None:
        await self.client.close()

    # -- helpers ------------------------------------------------------------------------------

    async def _update(
        self, key_id: str, change: Callable[[KeyRecord], KeyRecord | None]
    ) -> tuple[KeyRecord, bool]:
        """Apply `change` to the record by compare-and-set (None: leave it); (record, changed)."""
        for _ in range(_CAS_ATTEMPTS):
            raw = _text(await self._call("HGET", self._keys, key_id))
            if raw is None:
                raise KeyNotFound(f"no key with id {key_id!r}")
            record = decode_record(raw)
            changed = change(record)
            if changed is None:
                return record, False
            if await self._eval(
                _COMPARE_AND_SET, [self._keys], [key_id, raw, encode_record(changed)]
            ):
                return changed, True
        raise KeyStoreUnavailable(
            f"key store {self.where}: key {key_id} kept changing; nothing written, try again"
        )

    async def _call(self, *args: RespArg) -> Any:
        try:
            return await self.client.call(*args)
        except RespFailure as exc:
            raise KeyStoreUnavailable(f"key store: {exc}") from exc

    async def _call_many(self, commands: Sequence[Sequence[RespArg]]) -> list[Any]:
        try:
            return await self.client.call_many(commands)
        except RespFailure as exc:
            raise KeyStoreUnavailable(f"key store: {exc}") from exc

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[RespArg]) -> Any:
        try:
            return await self.client.evalsha(script, keys, args)
        except RespFailure as exc:
            raise KeyStoreUnavailable(f"key store: {exc}") from exc


def _pairs(reply: Any) -> dict[str, str]:
    """An HGETALL reply as a dict of text."""
    items = [_text(item) or "" for item in (reply or [])]
    return dict(zip(items[::2], items[1::2], strict=True))


def _with_last_used(record: KeyRecord, when: str | None) -> KeyRecord:
    try:
        return replace(record, last_used=float(when)) if when is not None else record
    except ValueError:
        return record
