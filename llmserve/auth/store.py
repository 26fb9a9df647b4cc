"""The key store seam: `KeyStoreBackend`, its two implementations, and `key_store_from_url`.

`auth.keys` chooses the store:

- a directory (`./.llmserve/keys`, `/var/lib/llmserve/keys`): `DirKeyStore`, the diskcache
  (SQLite) store of auth/keys.py, for one machine;
- `redis://host:6379/0` (also `rediss://`, `unix:///path.sock?db=N`): `RedisKeyStore`
  (auth/redis_store.py), shared by every replica behind a load balancer.

Both keep the same records (hashes and metadata, never a secret) and the same JWT
revocations, and both serve the authenticator and every `llmserve keys` command. The interface
is async because Redis is reached over the network; the directory store answers at once (one
SQLite read, tens of microseconds: cheaper than a thread hop).

Failures to reach the store raise `KeyStoreUnavailable`; "no such key" is `KeyNotFound`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from llmserve.auth.keys import (
    ImportCount,
    JwtRevocation,
    KeyNotFound,
    KeyRecord,
    KeyStore,
    KeyStoreUnavailable,
)
from llmserve.auth.store_url import check_key_store_url, is_redis_url, split_key_prefix
from llmserve.errors import ConfigError

__all__ = [
    "DirKeyStore",
    "KeyNotFound",
    "KeyStoreBackend",
    "KeyStoreUnavailable",
    "is_redis_url",
    "key_store_from_url",
]


class KeyStoreBackend(Protocol):
    """Where API key records and JWT revocations live. Every method may raise
    KeyStoreUnavailable; `get`, `revoke` and `rotate` raise KeyNotFound for an unknown id."""

    @property
    def where(self) -> str:
        """The store, for messages: a directory, or a Redis address (never a password)."""
        ...

    # -- the request path: one read each (for Redis, one round trip) -------------------------

    async def lookup(self, api_key: str) -> KeyRecord | None:
        """The record whose hash matches `api_key` (revoked or expired included), else None."""
        ...

    async def jwt_revocations(self, subject: str, token_id: str | None) -> list[JwtRevocation]:
        """The revocations in force for this subject and this token id (`jti`)."""
        ...

    async def touch(self, last_used: dict[str, float]) -> None:
        """Record last-use times, apart from the records (a revocation is never undone)."""
        ...

    # -- `llmserve keys` -----------------------------------------------------------------------

    async def get(self, key_id: str) -> KeyRecord: ...

    async def list_keys(self) -> list[KeyRecord]:
        """Every record, ordered by creation."""
        ...

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
        """A new key: (its record, the key). Only the record is stored."""
        ...

    async def revoke(self, key_id: str) -> KeyRecord: ...

    async def rotate(self, key_id: str) -> tuple[KeyRecord, str]: ...

    async def put_records(
        self, records: Iterable[KeyRecord], *, replace: bool = False
    ) -> ImportCount:
        """Store records as they are (`keys import`); existing ids are kept unless `replace`."""
        ...

    async def revoke_jwt(self, revocation: JwtRevocation) -> JwtRevocation:
        """Store a JWT revocation, merged with one of the same tokens still in force."""
        ...

    async def list_jwt_revocations(self) -> list[JwtRevocation]: ...

    async def close(self) -> None: ...


class DirKeyStore:
    """KeyStoreBackend over the diskcache directory store (auth/keys.py's KeyStore)."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> DirKeyStore:
        return cls(KeyStore(directory))

    @property
    def where(self) -> str:
        return f"directory {self.store.directory}"

    async def lookup(self, api_key: str) -> KeyRecord | None:
        return self.store.lookup(api_key)

    async def jwt_revocations(self, subject: str, token_id: str | None) -> list[JwtRevocation]:
        return self.store.jwt_revocations(subject, token_id)

    async def touch(self, last_used: dict[str, float]) -> None:
        self.store.touch(last_used)

    async def get(self, key_id: str) -> KeyRecord:
        return self.store.get(key_id)

    async def list_keys(self) -> list[KeyRecord]:
        return self.store.list()

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
        return self.store.create(
            name, tier=tier, models=models, expires=expires, admin=admin, limits=limits
        )

    async def revoke(self, key_id: str) -> KeyRecord:
        return self.store.revoke(key_id)

    async def rotate(self, key_id: str) -> tuple[KeyRecord, str]:
        return self.store.rotate(key_id)

    async def put_records(
        self, records: Iterable[KeyRecord], *, replace: bool = False
    ) -> ImportCount:
        return self.store.put_records(records, replace=replace)

    async def revoke_jwt(self, revocation: JwtRevocation) -> JwtRevocation:
        return self.store.revoke_jwt(revocation)

    async def list_jwt_revocations(self) -> list[JwtRevocation]:
        return self.store.list_jwt_revocations()

    async def close(self) -> None:
        self.store.close()


def key_store_from_url(value: str | os.PathLike[str]) -> KeyStoreBackend:
    """The store `auth.keys` names: a directory, or a Redis URL (`redis://`, `rediss://`,
    `unix://`, the URL forms and query options of limits.store: socket_timeout,
    socket_connect_timeout, `db` for unix://, and key_prefix, default `llmserve:auth:`).
    Nothing connects until the first call."""
    try:
        check_key_store_url(value)
    except ConfigError as exc:
        raise ConfigError(f"auth.keys: {exc}") from None
    if is_redis_url(value):
        from llmserve.auth.redis_store import RedisKeyStore

        url, prefix = split_key_prefix(str(value))
        return RedisKeyStore.from_url(url, key_prefix=prefix)
    return DirKeyStore.open(Path(value))
