"""Headers -> Principal: API keys and JWTs, with a short in-process cache of decisions.

`authenticate` is synchronous: a cached decision costs a dict lookup, an uncached key one
SQLite read (tens of microseconds), cheaper than a thread hop. Decisions, refusals included,
are cached for `auth.cache_seconds` (at most 1 s by config), which is what bounds how long a
running server keeps accepting a key the CLI has just revoked or rotated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from llmserve.auth.jwt import JwtVerifier
from llmserve.auth.keys import KEY_PREFIX, KeyRecord
from llmserve.auth.principal import Principal
from llmserve.config import AuthConfig
from llmserve.errors import AuthenticationFailed, InvalidRequest

ANONYMOUS_ADMIN = Principal(id="anonymous", kind="anonymous", admin=True)
MAX_CREDENTIAL_CHARS = 8192  # far above any key or sane JWT; longer is refused unparsed
CACHE_MAX_ENTRIES = 10_000  # bounds memory when a client sprays random credentials
LAST_USED_FLUSH_SECONDS = 60.0

_MISSING = (
    "missing_api_key",
    "You didn't provide an API key. Send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
)
_BAD_SCHEME = (
    "invalid_authorization_header",
    "The Authorization header must read 'Bearer <API key or token>'.",
)
_BAD_KEY = ("invalid_api_key", "Incorrect API key provided.")
_EXPIRED_KEY = ("api_key_expired", "This API key has expired; ask for a new one.")
_NO_JWT = ("invalid_token", "This server does not accept JWTs; use an API key.")


class KeyLookup(Protocol):
    def lookup(self, api_key: str) -> KeyRecord | None: ...

    def touch(self, last_used: dict[str, float]) -> None: ...


@dataclass(slots=True)
class _Decision:
    fresh_until: float  # monotonic clock: re-decide after this
    principal: Principal | None = None
    valid_until: float | None = None  # wall clock: key expiry or JWT exp + leeway
    failure: tuple[str, str] | None = None  # (code, message)


def _refuse(failure: tuple[str, str]) -> AuthenticationFailed:
    code, message = failure
    challenge = "Bearer" if code == "missing_api_key" else 'Bearer error="invalid_token"'
    return AuthenticationFailed(message, code=code, headers={"WWW-Authenticate": challenge})


def extract_credential(headers: Mapping[str, str]) -> str:
    """The bearer credential from `Authorization` or `X-API-Key`. Two credentials (the same
    header twice, or both headers with different values) are a 400: which one a proxy or a
    server believes must never be a guess."""
    _one_each(headers)
    credential = _bearer(headers)
    api_key = headers.get("X-API-Key", "").strip()
    if credential and api_key and api_key != credential:
        raise _ambiguous()
    if credential:
        return credential
    if not api_key:
        raise _refuse(_MISSING)
    return api_key


def _one_each(headers: Mapping[str, str]) -> None:
    getall = getattr(headers, "getall", None)
    if getall is None:
        return
    for name in ("Authorization", "X-API-Key"):
        if len(getall(name, ())) > 1:
            raise _ambiguous()


def _ambiguous() -> InvalidRequest:
    return InvalidRequest(
        "Send one credential: this request carries two (Authorization twice, X-API-Key twice, "
        "or both headers with different values).",
        code="ambiguous_credentials",
    )


def _bearer(headers: Mapping[str, str]) -> str:
    authorization = headers.get("Authorization", "").strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise _refuse(_BAD_SCHEME)
        value = value.strip()
        if not value:
            raise _refuse(_MISSING)
        return value
    return ""


def _key_principal(record: KeyRecord) -> Principal:
    return Principal(
        id=record.id,
        tier=record.tier,
        models=frozenset(record.models) if record.models is not None else None,
        kind="key",
        admin=record.admin,
        limit_overrides=dict(record.limits),
    )


class Authenticator:
    """Decides who is calling. One per server process; not shared across event loops."""

    def __init__(
        self,
        config: AuthConfig,
        store: KeyLookup | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall_clock: Callable[[], float] = time.time,
        jwt_verifier: JwtVerifier | None = None,
        known_tiers: Iterable[str] | None = None,
    ) -> None:
        self._enabled = config.enabled
        self._ttl = config.cache_seconds
        self._store = store
        self._clock = clock
        self._wall = wall_clock
        if jwt_verifier is None and config.jwt is not None and config.enabled:
            jwt_verifier = JwtVerifier(config.jwt, known_tiers)
        self._jwt = jwt_verifier
        self._jwt_leeway = config.jwt.leeway_seconds if config.jwt is not None else 0.0
        self._cache: dict[str, _Decision] = {}
        self._last_used: dict[str, float] = {}
        self._last_flush = clock()

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller's Principal, or AuthenticationFailed (401) with a string code."""
        if not self._enabled:
            return ANONYMOUS_ADMIN
        credential = extract_credential(headers)
        now = self._clock()
        decision = self._cache.get(credential)
        if decision is None or decision.fresh_until <= now:
            decision = self._decide(credential, now)
        elif decision.valid_until is not None and self._wall() >= decision.valid_until:
            decision = self._decide(credential, now)  # expired while cached: say so exactly
        if decision.failure is not None:
            raise _refuse(decision.failure)
        principal = decision.principal
        assert principal is not None
        if principal.kind == "key":
            self._note_use(principal.id, now)
        return principal

    def flush_last_used(self) -> None:
        """Write pending last-use times to the store (also done once a minute, and at close)."""
        pending, self._last_used = self._last_used, {}
        self._last_flush = self._clock()
        if pending and self._store is not None:
            self._store.touch(pending)

    def close(self) -> None:
        self.flush_last_used()

    # -- internals ----------------------------------------------------------------------------

    def _decide(self, credential: str, now: float) -> _Decision:
        if len(credential) > MAX_CREDENTIAL_CHARS:
            return _Decision(fresh_until=now, failure=_BAD_KEY)  # not cached: never repeats
        if credential.startswith(KEY_PREFIX):
            decision = self._decide_key(credential, now)
        elif credential.count(".") == 2:
            decision = self._decide_jwt(credential, now)
        else:
            decision = _Decision(fresh_until=now + self._ttl, failure=_BAD_KEY)
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            self._cache.clear()
        self._cache[credential] = decision
        return decision

    def _decide_key(self, api_key: str, now: float) -> _Decision:
        fresh_until = now + self._ttl
        record = self._store.lookup(api_key) if self._store is not None else None
        # Unknown, wrong secret and revoked all read the same: no oracle for which ids exist.
        if record is None or record.revoked is not None:
            return _Decision(fresh_until, failure=_BAD_KEY)
        if record.is_expired(self._wall()):
            return _Decision(fresh_until, failure=_EXPIRED_KEY)
        return _Decision(fresh_until, _key_principal(record), valid_until=record.expires)

    def _decide_jwt(self, token: str, now: float) -> _Decision:
        fresh_until = now + self._ttl
        if self._jwt is None:
            return _Decision(fresh_until, failure=_NO_JWT)
        try:
            verified = self._jwt.verify(token)
        except AuthenticationFailed as exc:
            return _Decision(fresh_until, failure=(exc.code or "invalid_token", exc.message))
        valid_until = verified.expires + self._jwt_leeway
        return _Decision(fresh_until, verified.principal, valid_until=valid_until)

    def _note_use(self, key_id: str, now: float) -> None:
        self._last_used[key_id] = self._wall()
        if now - self._last_flush >= LAST_USED_FLUSH_SECONDS:
            self.flush_last_used()
