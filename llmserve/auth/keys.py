"""API keys: random secrets of which only a hash is kept, in a diskcache store on local disk.

A key reads `sk-llms-<id>-<secret>`: the 12-hex-digit public id names the key in logs and in
`llmserve keys`; the secret is 32 random bytes. The store maps the id to a record holding
sha256(key). SHA-256 without salt or stretching is enough because the key has 256 bits of
entropy: there is nothing to brute-force. The CLI and a running server open the same
directory (SQLite underneath), so a revocation is visible to the server on its next read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import diskcache

from llmserve.errors import LLMServeError

KEY_PREFIX = "sk-llms-"
ID_HEX_DIGITS = 12
SECRET_BYTES = 32
_RECORD_PREFIX = "key/"
_LAST_USED_PREFIX = "last_used/"
_DECOY = "timing/decoy"  # a record-sized entry that always exists
_ABSENT = "timing/absent"  # an entry that never exists
_DIR_MODE = 0o700
_FILE_MODE = 0o600


class KeyNotFound(LLMServeError):
    """No key has this id (raised to the CLI only; the HTTP path never says so)."""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    key_hash: str  # sha256 hex of the whole key; never shown
    tier: str | None = None  # None: limits.default_tier
    models: tuple[str, ...] | None = None  # None: every model
    created: float = 0.0  # epoch seconds
    expires: float | None = None  # epoch seconds; None: never
    revoked: float | None = None  # epoch seconds of the revocation; None: active
    admin: bool = False
    limits: dict[str, int] = field(default_factory=dict)  # per-key overrides of the tier
    last_used: float | None = None  # filled in by `get`/`list`, stored apart (see `touch`)

    def is_expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def public_dict(self) -> dict[str, object]:
        """Everything but the hash: what `keys show --json` prints."""
        data = asdict(self)
        del data["key_hash"]
        data["models"] = list(self.models) if self.models is not None else None
        return data


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def parse_key_id(api_key: str) -> str | None:
    """The public id of a well-formed key, else None (no store access needed to refuse)."""
    if not api_key.startswith(KEY_PREFIX):
        return None
    key_id = api_key[len(KEY_PREFIX) : len(KEY_PREFIX) + ID_HEX_DIGITS]
    if len(key_id) != ID_HEX_DIGITS or api_key[len(KEY_PREFIX) + ID_HEX_DIGITS :][:1] != "-":
        return None
    if any(c not in "0123456789abcdef" for c in key_id):
        return None
    return key_id


def _new_key(key_id: str) -> str:
    return f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(SECRET_BYTES)}"


# A record-shaped JSON string decoded when an id is unknown, so an unknown id costs about what
# a known one does (see `lookup`).
_DUMMY_RAW = json.dumps(
    asdict(KeyRecord(id="0" * ID_HEX_DIGITS, name="x" * 16, key_hash="0" * 64, tier="default"))
)


class KeyStore:
    """Create, read, revoke and rotate API keys in `directory` (created 0700, files 0600)."""

    def __init__(self, directory: str | os.PathLike[str], *, now: Callable[[], float] = time.time):
        self.directory = Path(directory)
        self._now = now
        _make_private_dir(self.directory)
        _precreate_private(self.directory / diskcache.core.DBNAME)
        # eviction "none": a key store must never drop records to save space.
        self._cache = diskcache.Cache(str(self.directory), eviction_policy="none")
        _restrict_files(self.directory)
        if _DECOY not in self._cache:
            self._cache.set(_DECOY, _DUMMY_RAW)

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads --------------------------------------------------------------------------------

    def lookup(self, api_key: str) -> KeyRecord | None:
        """The record whose hash matches `api_key` (revoked or expired included), else None.

        Unknown ids and wrong secrets take the same path: a record (real or dummy) is decoded
        and the hash compared with `hmac.compare_digest`.
        """
        key_id = parse_key_id(api_key)
        if key_id is None:
            return None
        raw = self._cache.get(_RECORD_PREFIX + key_id)
        # A hit is slower than a miss in SQLite; pairing each with the other kind of read makes
        # both paths one hit plus one miss.
        self._cache.get(_ABSENT if raw is not None else _DECOY)
        record = _decode(raw if isinstance(raw, str) else _DUMMY_RAW)
        matches = hmac.compare_digest(record.key_hash, hash_key(api_key))
        return record if matches and raw is not None else None

    def get(self, key_id: str) -> KeyRecord:
        raw = self._cache.get(_RECORD_PREFIX + key_id)
        if not isinstance(raw, str):
            raise KeyNotFound(f"no key with id {key_id!r}")
        return self._with_last_used(_decode(raw))

    def list(self) -> list[KeyRecord]:
        records = []
        for name in self._cache.iterkeys():
            if isinstance(name, str) and name.startswith(_RECORD_PREFIX):
                raw = self._cache.get(name)
                if isinstance(raw, str):
                    records.append(self._with_last_used(_decode(raw)))
        return sorted(records, key=lambda r: (r.created, r.id))

    # -- writes -------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        tier: str | None = None,
        models: Iterable[str] | None = None,
        expires: float | None = None,
        admin: bool = False,
        limits: dict[str, int] | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key: (its record, the key). The key itself is not kept: it is shown once."""
        with self._cache.transact():
            key_id = self._unused_id()
            api_key = _new_key(key_id)
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
            self._put(record)
        return record, api_key

    def revoke(self, key_id: str) -> KeyRecord:
        with self._cache.transact():
            record = self.get(key_id)
            if record.revoked is None:
                record = replace(record, revoked=self._now())
                self._put(record)
        return record

    def rotate(self, key_id: str) -> tuple[KeyRecord, str]:
        """A new secret for the same record (id, tier, limits, usage stay); the old one stops."""
        with self._cache.transact():
            record = self.get(key_id)
            api_key = _new_key(key_id)
            record = replace(record, key_hash=hash_key(api_key))
            self._put(record)
        return record, api_key

    def touch(self, last_used: dict[str, float]) -> None:
        """Record last-use times. Stored apart from the records so that a server writing these
        can never overwrite a revocation the CLI made in between."""
        with self._cache.transact():
            for key_id, when in last_used.items():
                self._cache.set(_LAST_USED_PREFIX + key_id, when)

    # -- helpers ------------------------------------------------------------------------------

    def _put(self, record: KeyRecord) -> None:
        data = asdict(record)
        data["last_used"] = None
        self._cache.set(_RECORD_PREFIX + record.id, json.dumps(data))

    def _unused_id(self) -> str:
        while True:
            key_id = secrets.token_hex(ID_HEX_DIGITS // 2)
            if _RECORD_PREFIX + key_id not in self._cache:
                return key_id

    def _with_last_used(self, record: KeyRecord) -> KeyRecord:
        when = self._cache.get(_LAST_USED_PREFIX + record.id)
        return replace(record, last_used=when) if isinstance(when, int | float) else record


def _decode(raw: str) -> KeyRecord:
    data = json.loads(raw)
    models = data.get("models")
    data["models"] = tuple(models) if models is not None else None
    return KeyRecord(**data)


def _make_private_dir(directory: Path) -> None:
    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(directory, _DIR_MODE)


def _precreate_private(path: Path) -> None:
    # SQLite gives its -wal and -shm files the mode of the database file: create that one 0600
    # before diskcache opens it, so no file of the store is ever readable by others.
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, _FILE_MODE)
    os.close(fd)


def _restrict_files(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, _FILE_MODE)
