"""API keys: random secrets of which only a hash is kept, in a diskcache store on local disk.

A key reads `sk-llms-<id>-<secret>`: the 12-hex-digit public id names the key in logs and in
`llmserve keys`; the secret is 32 random bytes. The store maps the id to a record holding
sha256(key). SHA-256 without salt or stretching is enough because the key has 256 bits of
entropy: there is nothing to brute-force. The CLI and a running server open the same
directory (SQLite underneath), so a revocation is visible to the server on its next read.

The same directory holds JWT revocations (`JwtRevocation`). The records and revocations here
are what every key store keeps (auth/store.py chooses one by `auth.keys`; auth/redis_store.py
keeps the same ones in Redis), and what `llmserve keys export` writes.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import diskcache

from llmserve.errors import LLMServeError

KEY_PREFIX = "sk-llms-"
ID_HEX_DIGITS = 12
SECRET_BYTES = 32
_RECORD_PREFIX = "key/"
_LAST_USED_PREFIX = "last_used/"
_JWT_PREFIX = "jwt_revoked/"
_DECOY = "timing/decoy"  # a record-sized entry that always exists
_ABSENT = "timing/absent"  # an entry that never exists
_DIR_MODE = 0o700
_FILE_MODE = 0o600


class KeyNotFound(LLMServeError):
    """No key has this id (raised to the CLI only; the HTTP path never says so)."""


class KeyStoreUnavailable(LLMServeError):
    """The key store cannot be read or written now (Redis down, slow or refusing): the
    authenticator answers 503 `auth_unavailable` for what it has not decided recently, never a
    401 that would tell a client its key is wrong."""


class InvalidExport(LLMServeError):
    """A `keys export` file (or one record of it) that `keys import` cannot take."""


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


JwtRevocationKind = Literal["sub", "jti"]


@dataclass(frozen=True)
class JwtRevocation:
    """JWTs refused before their `exp`: every token of a subject issued (`iat`) up to
    `revoked_at` (plus the clock leeway), or the one token with this `jti`. Kept, and enforced,
    until `until` (epoch seconds); later the entry is dropped."""

    kind: JwtRevocationKind
    value: str  # the subject (auth.jwt.subject_claim) or the token id (`jti`)
    revoked_at: float
    until: float

    @property
    def field(self) -> str:
        return f"{self.kind}:{self.value}"

    def active(self, now: float) -> bool:
        return now < self.until

    def refuses(self, issued_at: float | None, leeway: float = 0.0) -> bool:
        """Whether a token with this `iat` (None: the token has none) is refused. A subject's
        tokens issued after the revocation (the user signed in again) are not."""
        if self.kind == "jti":
            return True
        return issued_at is None or issued_at <= self.revoked_at + leeway

    def merged(self, other: JwtRevocation | None, now: float) -> JwtRevocation:
        """This revocation combined with an earlier one of the same token(s) still in force:
        the later revocation time and the later end, so a merge never refuses less."""
        if other is None or not other.active(now):
            return self
        return replace(
            self,
            revoked_at=max(self.revoked_at, other.revoked_at),
            until=max(self.until, other.until),
        )

    def encode(self) -> str:
        """The stored value: `<revoked_at> <until>` (the field names kind and value)."""
        return f"{self.revoked_at!r} {self.until!r}"

    @classmethod
    def decode(cls, stored_field: str, value: str) -> JwtRevocation | None:
        kind, _, subject = stored_field.partition(":")
        at, _, until = value.partition(" ")
        try:
            revoked_at, ends = float(at), float(until)
        except ValueError:
            return None
        if kind not in ("sub", "jti"):
            return None
        return cls("sub" if kind == "sub" else "jti", subject, revoked_at, ends)


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


def new_key(key_id: str) -> str:
    """A fresh key for this id: the secret part is 32 random bytes."""
    return f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(SECRET_BYTES)}"


# A record-shaped JSON string decoded when an id is unknown, so an unknown id costs about what
# a known one does (see `lookup`).
DUMMY_RECORD_JSON = json.dumps(
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
            self._cache.set(_DECOY, DUMMY_RECORD_JSON)

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
        record = _decode(raw if isinstance(raw, str) else DUMMY_RECORD_JSON)
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
            api_key = new_key(key_id)
            record = replace(record, key_hash=hash_key(api_key))
            self._put(record)
        return record, api_key

    def touch(self, last_used: dict[str, float]) -> None:
        """Record last-use times, keeping a later one already stored (by another server).
        Stored apart from the records so that a server writing these can never overwrite a
        revocation the CLI made in between."""
        with self._cache.transact():
            for key_id, when in last_used.items():
                self._set_if_later(key_id, when)

    def put_records(self, records: Iterable[KeyRecord], *, replace: bool = False) -> ImportCount:
        """Add records as they are (`keys import`): an id already here is kept unless
        `replace`. A record's `last_used` is kept too, unless the store knows a later one."""
        count = ImportCount()
        with self._cache.transact():
            for record in records:
                raw = self._cache.get(_RECORD_PREFIX + record.id)
                if isinstance(raw, str) and not replace:
                    count.kept += 1
                    continue
                count.replaced += isinstance(raw, str)
                count.added += not isinstance(raw, str)
                self._put(record)
                if record.last_used is not None:
                    self._set_if_later(record.id, record.last_used)
        return count

    def _set_if_later(self, key_id: str, when: float) -> None:
        stored = self._cache.get(_LAST_USED_PREFIX + key_id)
        if not (isinstance(stored, int | float) and stored >= when):
            self._cache.set(_LAST_USED_PREFIX + key_id, when)

    # -- JWT revocations ----------------------------------------------------------------------

    def revoke_jwt(self, revocation: JwtRevocation) -> JwtRevocation:
        """Store a revocation, merged with one of the same tokens still in force; it is
        dropped at its `until`."""
        now = self._now()
        with self._cache.transact():
            stored = self._jwt_entry(revocation.field, now)
            merged = revocation.merged(stored, now)
            self._cache.set(
                _JWT_PREFIX + merged.field, merged.encode(), expire=max(merged.until - now, 1e-3)
            )
        return merged

    def jwt_revocations(self, subject: str, token_id: str | None) -> builtins.list[JwtRevocation]:
        """The revocations in force for this subject and this token id."""
        now = self._now()
        fields = [f"sub:{subject}"] + ([f"jti:{token_id}"] if token_id is not None else [])
        return [r for f in fields if (r := self._jwt_entry(f, now)) is not None]

    def list_jwt_revocations(self) -> builtins.list[JwtRevocation]:
        now = self._now()
        found = []
        for name in self._cache.iterkeys():
            if isinstance(name, str) and name.startswith(_JWT_PREFIX):
                entry = self._jwt_entry(name[len(_JWT_PREFIX) :], now)
                if entry is not None:
                    found.append(entry)
        return sorted(found, key=lambda r: (r.revoked_at, r.field))

    def _jwt_entry(self, stored_field: str, now: float) -> JwtRevocation | None:
        raw = self._cache.get(_JWT_PREFIX + stored_field)
        entry = JwtRevocation.decode(stored_field, raw) if isinstance(raw, str) else None
        return entry if entry is not None and entry.active(now) else None

    # -- helpers ------------------------------------------------------------------------------

    def _put(self, record: KeyRecord) -> None:
        self._cache.set(_RECORD_PREFIX + record.id, encode_record(record))

    def _unused_id(self) -> str:
        while True:
            key_id = secrets.token_hex(ID_HEX_DIGITS // 2)
            if _RECORD_PREFIX + key_id not in self._cache:
                return key_id

    def _with_last_used(self, record: KeyRecord) -> KeyRecord:
        when = self._cache.get(_LAST_USED_PREFIX + record.id)
        return replace(record, last_used=when) if isinstance(when, int | float) else record


@dataclass
class ImportCount:
    """What `keys import` did: records added, replaced (`--replace`), or kept as they were."""

    added: int = 0
    replaced: int = 0
    kept: int = 0


# -- export format (`llmserve keys export` / `import`): hashes and metadata, never secrets -----

EXPORT_FORMAT = "llmserve-keys"
EXPORT_VERSION = 1
_HEX = frozenset("0123456789abcdef")


def record_to_export(record: KeyRecord) -> dict[str, Any]:
    data = asdict(record)
    data["models"] = list(record.models) if record.models is not None else None
    return data


def revocation_to_export(revocation: JwtRevocation) -> dict[str, Any]:
    return asdict(revocation)


def record_from_export(data: Any) -> KeyRecord:
    """A KeyRecord from one exported record, checked field by field (InvalidExport)."""
    if not isinstance(data, dict):
        raise InvalidExport("a key record must be a JSON object")
    known = {f for f in KeyRecord.__dataclass_fields__}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidExport(f"unknown key record fields: {', '.join(unknown)}")
    key_id, key_hash = data.get("id"), data.get("key_hash")
    if not (isinstance(key_id, str) and len(key_id) == ID_HEX_DIGITS and set(key_id) <= _HEX):
        raise InvalidExport(f"a key record has an invalid id: {key_id!r}")
    if not (isinstance(key_hash, str) and len(key_hash) == 64 and set(key_hash) <= _HEX):
        raise InvalidExport(f"key {key_id}: key_hash must be 64 hex digits (a SHA-256)")
    try:
        record = _decode(json.dumps(data))
    except (TypeError, ValueError) as exc:
        raise InvalidExport(f"key {key_id}: {exc}") from None
    _check_record_types(record)
    return record


def _check_record_types(r: KeyRecord) -> None:
    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    problems = [
        name
        for name, ok in (
            ("name", isinstance(r.name, str)),
            ("tier", r.tier is None or isinstance(r.tier, str)),
            ("models", r.models is None or all(isinstance(m, str) for m in r.models)),
            ("created", number(r.created)),
            ("expires", r.expires is None or number(r.expires)),
            ("revoked", r.revoked is None or number(r.revoked)),
            ("admin", isinstance(r.admin, bool)),
            (
                "limits",
                isinstance(r.limits, dict)
                and all(isinstance(k, str) and number(v) for k, v in r.limits.items()),
            ),
            ("last_used", r.last_used is None or number(r.last_used)),
        )
        if not ok
    ]
    if problems:
        raise InvalidExport(f"key {r.id}: wrong type for {', '.join(problems)}")


def revocation_from_export(data: Any) -> JwtRevocation:
    if not isinstance(data, dict) or set(data) != {"kind", "value", "revoked_at", "until"}:
        raise InvalidExport("a JWT revocation needs exactly kind, value, revoked_at, until")
    kind, value, at, until = data["kind"], data["value"], data["revoked_at"], data["until"]
    if kind not in ("sub", "jti") or not isinstance(value, str) or not value:
        raise InvalidExport(f"a JWT revocation has an invalid kind or value: {kind!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (at, until)):
        raise InvalidExport(f"JWT revocation {kind}:{value}: times must be numbers")
    return JwtRevocation("sub" if kind == "sub" else "jti", value, float(at), float(until))


def export_document(
    records: Iterable[KeyRecord], revocations: Iterable[JwtRevocation], exported: float
) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "exported": exported,
        "keys": [record_to_export(r) for r in records],
        "jwt_revocations": [revocation_to_export(r) for r in revocations],
    }


def parse_export(text: str) -> tuple[list[KeyRecord], list[JwtRevocation]]:
    """The records and revocations of a `keys export` file (InvalidExport when it is not one)."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise InvalidExport(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise InvalidExport(f'not a `llmserve keys export` file (no "format": {EXPORT_FORMAT!r})')
    if document.get("version") != EXPORT_VERSION:
        raise InvalidExport(f"export version {document.get('version')!r} is not supported")
    keys, revocations = document.get("keys"), document.get("jwt_revocations", [])
    if not isinstance(keys, list) or not isinstance(revocations, list):
        raise InvalidExport("`keys` and `jwt_revocations` must be lists")
    records = [record_from_export(item) for item in keys]
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise InvalidExport("the same key id appears twice")
    return records, [revocation_from_export(item) for item in revocations]


def encode_record(record: KeyRecord) -> str:
    """A record as stored: JSON of every field, `last_used` kept apart (None here)."""
    data = asdict(record)
    data["last_used"] = None
    return json.dumps(data)


def decode_record(raw: str) -> KeyRecord:
    return _decode(raw)


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
