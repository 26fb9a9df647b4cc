"""Headers -> Principal: API keys and JWTs, with a short in-process cache of decisions.

A cached decision costs a dict lookup. An uncached one needs the key store once: an API key's
record, or a verified JWT's revocations (auth/store.py: one SQLite read for a directory store,
one round trip for Redis). Concurrent requests with the same uncached credential share that
read. Decisions, refusals included, are cached for `auth.cache_seconds` (at most 1 s by
config), which is what bounds how long a server keeps accepting a key or a JWT that the CLI or
another replica has just revoked or rotated.

When the store cannot be asked (Redis down or slow), a credential decided within
`auth.stale_if_error_seconds` (past its freshness) keeps its last decision; any other gets a
503 `auth_unavailable` with Retry-After, never a 401 that would tell a client its key is wrong.
After a failure the store is left alone for a second (StoreBreaker), so a dead Redis costs a
request nothing.

JWTs verified with a JWKS URL (auth/jwks.py) need keys fetched from the identity provider: the
refresher starts with `start()` (the server calls it as it starts) and stops with `close()`.
While it has no keys a JWT gets 503 `auth_unavailable`, never a 401. `reconfigure` swaps the
auth settings of a running server (reload), the key store excepted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from llmserve.auth.jwks import JwksRefresher, JwksStats, jwks_settings
from llmserve.auth.jwt import JwtVerifier, VerifiedToken
from llmserve.auth.keys import KEY_PREFIX, KeyRecord, KeyStore, KeyStoreUnavailable, parse_key_id
from llmserve.auth.principal import Principal
from llmserve.auth.store import DirKeyStore, KeyStoreBackend
from llmserve.config import AuthConfig
from llmserve.errors import (
    AuthenticationFailed,
    ConfigError,
    InvalidRequest,
    ServiceUnavailable,
    retry_after_header,
)
from llmserve.limits.breaker import StoreBreaker

ANONYMOUS_ADMIN = Principal(id="anonymous", kind="anonymous", admin=True)
MAX_CREDENTIAL_CHARS = 8192  # far above any key or sane JWT; longer is refused unparsed
CACHE_MAX_ENTRIES = 10_000  # bounds memory when a client sprays random credentials
LAST_USED_FLUSH_SECONDS = 60.0
STORE_RETRY_SECONDS = 1.0  # after a store failure, it is not asked again for this long

log = logging.getLogger("llmserve.auth")

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
_REVOKED_TOKEN = ("token_revoked", "This token has been revoked; get a new one.")


@dataclass(slots=True)
class _Decision:
    fresh_until: float  # monotonic clock: re-decide after this
    principal: Principal | None = None
    valid_until: float | None = None  # wall clock: key expiry or JWT exp + leeway
    failure: tuple[str, str] | None = None  # (code, message)
    unavailable: bool = False  # the store could not be asked and nothing recent is known


def _refuse(failure: tuple[str, str]) -> AuthenticationFailed:
    code, message = failure
    challenge = "Bearer" if code == "missing_api_key" else 'Bearer error="invalid_token"'
    return AuthenticationFailed(message, code=code, headers={"WWW-Authenticate": challenge})


def _unavailable(retry_in: float) -> ServiceUnavailable:
    return ServiceUnavailable(
        "Credentials cannot be checked right now (the key store is unreachable); retry shortly.",
        code="auth_unavailable",
        headers=retry_after_header(retry_in),
    )


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
        store: KeyStoreBackend | KeyStore | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall_clock: Callable[[], float] = time.time,
        jwt_verifier: JwtVerifier | None = None,
        known_tiers: Iterable[str] | None = None,
    ) -> None:
        self._config = config
        self._enabled = config.enabled
        self._ttl = config.cache_seconds
        self._stale = config.stale_if_error_seconds
        self._store: KeyStoreBackend | None = (
            DirKeyStore(store) if isinstance(store, KeyStore) else store
        )
        self._clock = clock
        self._wall = wall_clock
        if jwt_verifier is None and config.jwt is not None and config.enabled:
            jwt_verifier = JwtVerifier(config.jwt, known_tiers, clock=clock, wall_clock=wall_clock)
        self._jwt = jwt_verifier
        self._jwt_leeway = config.jwt.leeway_seconds if config.jwt is not None else 0.0
        self._retired = JwksStats()  # counts of JWKS refreshers that reconfigure replaced
        self._generation = 0  # +1 per reconfigure: decisions made before are not cached
        self._started = False
        self._closed = False
        self._reconfiguring = asyncio.Lock()
        self._cache: dict[str, _Decision] = {}
        # One store read per credential at a time: concurrent misses wait for the same one.
        self._pending: dict[str, asyncio.Future[_Decision]] = {}
        self._breaker = StoreBreaker(clock, cooldown=STORE_RETRY_SECONDS)
        self._last_used: dict[str, float] = {}
        self._last_flush = clock()
        self._flushing: asyncio.Future[None] | None = None

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller's Principal, or AuthenticationFailed (401) with a string code, or
        ServiceUnavailable (503 `auth_unavailable`) when the key store cannot be asked."""
        if not self._enabled:
            return ANONYMOUS_ADMIN
        credential = extract_credential(headers)
        now = self._clock()
        decision = self._cache.get(credential)
        if (
            decision is None
            or decision.fresh_until <= now
            or (decision.valid_until is not None and self._wall() >= decision.valid_until)
        ):  # absent, aged out, or expired while cached (then say so exactly)
            decision = await self._decide(credential, now, decision)
        if decision.unavailable:
            raise _unavailable(self._breaker.retry_in())
        if decision.failure is not None:
            raise _refuse(decision.failure)
        principal = decision.principal
        assert principal is not None
        if principal.kind == "key":
            self._note_use(principal.id, now)
        return principal

    async def flush_last_used(self) -> None:
        """Write pending last-use times to the store (also done once a minute, and at close).
        When the store cannot take them they are kept for the next flush."""
        pending, self._last_used = self._last_used, {}
        self._last_flush = self._clock()
        if not pending or self._store is None:
            return
        try:
            await self._store.touch(pending)
        except KeyStoreUnavailable as exc:
            log.warning("last-use times not written, kept for the next flush: %s", exc)
            self._last_used = {**pending, **self._last_used}

    async def start(self) -> None:
        """Start the background work: the JWKS refresher, when JWTs are verified with keys from
        a URL (its first fetch begins now; its failure is logged and retried, never fatal)."""
        if self._started or self._closed:
            return
        self._started = True
        remote = self._remote()
        if remote is not None:
            await remote.start()

    async def close(self) -> None:
        """Stop the JWKS refresher (no task of it is left) and write last-use times."""
        self._closed = True
        remote = self._remote()
        if remote is not None:
            await remote.close()
        if self._flushing is not None:
            await self._flushing
        await self.flush_last_used()

    def jwks_stats(self) -> JwksStats | None:
        """For `llmserve_jwks_*` (read at scrape time): None unless keys come from a URL.
        The counters add up every source this server has followed since it started."""
        remote = self._remote()
        if remote is None:
            return None
        now, old = remote.stats, self._retired
        return JwksStats(refreshes=now.refreshes + old.refreshes,
                         failures=now.failures + old.failures,
                         last_success=now.last_success, keys=now.keys)  # fmt: skip

    async def reconfigure(self, config: AuthConfig, known_tiers: Iterable[str] | None) -> None:
        """Swap the auth settings of a running server: cache times, JWT settings (a new JWKS
        source is fetched once first, then its refresher replaces the old one, which is
        closed; an unchanged source keeps running). The decision cache is cleared. All or
        nothing: ConfigError, with nothing changed, for a change of `auth.enabled` or
        `auth.keys` (they need a restart), invalid JWT settings, or a new JWKS source whose
        first fetch fails."""
        async with self._reconfiguring:
            self._check_reconfigurable(config)
            old_remote = self._remote()
            verifier: JwtVerifier | None = None
            if config.jwt is not None and config.enabled:
                keep = old_remote is not None and old_remote.settings == jwks_settings(config.jwt)
                verifier = JwtVerifier(config.jwt, known_tiers, jwks=old_remote if keep else None,
                                       clock=self._clock, wall_clock=self._wall)  # fmt: skip
            new_remote = verifier.remote if verifier is not None else None
            if new_remote is not None and new_remote is not old_remote and self._started:
                fetched = await new_remote.start(wait_for_first=True)
                if not fetched or self._closed:
                    await self._retire(new_remote)
                    if self._closed:
                        raise ConfigError("auth: the server is stopping; nothing changed")
                    raise ConfigError(
                        f"auth.jwt: the new JWKS source {new_remote.source} could not be "
                        f"fetched ({new_remote.last_error}); the auth settings are unchanged"
                    )
            # No await from here until the swap is complete: a request sees old or new.
            self._config = config
            self._ttl = config.cache_seconds
            self._stale = config.stale_if_error_seconds
            self._jwt = verifier
            self._jwt_leeway = config.jwt.leeway_seconds if config.jwt is not None else 0.0
            self._generation += 1
            self._cache.clear()
            self._pending.clear()  # reads in flight finish for their waiters, uncached
            if old_remote is not None and old_remote is not new_remote:
                await self._retire(old_remote)
            if new_remote is not None and new_remote is not old_remote:
                log.info("auth settings reconfigured: JWT keys now from %s", new_remote.source)
            else:
                log.info("auth settings reconfigured")

    def _check_reconfigurable(self, config: AuthConfig) -> None:
        if self._closed:
            raise ConfigError("auth: the server is stopping; nothing changed")
        if config.enabled != self._config.enabled:
            raise ConfigError(
                f"auth.enabled: changing it ({self._config.enabled} -> {config.enabled}) needs "
                "a restart"
            )
        if str(config.keys) != str(self._config.keys):
            raise ConfigError("auth.keys: changing the key store needs a restart")

    def _remote(self) -> JwksRefresher | None:
        return self._jwt.remote if self._jwt is not None else None

    async def _retire(self, remote: JwksRefresher) -> None:
        self._retired.refreshes += remote.stats.refreshes
        self._retired.failures += remote.stats.failures
        await remote.close()

    # -- internals ----------------------------------------------------------------------------

    async def _decide(self, credential: str, now: float, previous: _Decision | None) -> _Decision:
        if len(credential) > MAX_CREDENTIAL_CHARS:
            return _Decision(fresh_until=now, failure=_BAD_KEY)  # not cached: never repeats
        fresh_until = now + self._ttl
        generation = self._generation
        if credential.startswith(KEY_PREFIX):
            if parse_key_id(credential) is None or self._store is None:
                decision = _Decision(fresh_until, failure=_BAD_KEY)  # no store read needed
            else:
                read = functools.partial(self._decide_key, credential, now)
                decision = await self._ask_store(credential, read, now, previous)
        elif credential.count(".") == 2:
            # ServiceUnavailable (JWKS keys not available) propagates: never cached.
            decision, verified = await self._verify_jwt(credential, fresh_until)
            if verified is not None and self._store is not None:
                read = functools.partial(self._check_revocations, verified, now)
                decision = await self._ask_store(credential, read, now, previous)
        else:
            decision = _Decision(fresh_until, failure=_BAD_KEY)
        if decision.unavailable or generation != self._generation:
            return decision  # not cached: unavailable, or decided under replaced settings
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            self._cache.clear()
        self._cache[credential] = decision
        return decision

    async def _ask_store(
        self,
        credential: str,
        read: Callable[[], Awaitable[_Decision]],
        now: float,
        previous: _Decision | None,
    ) -> _Decision:
        """The decision that needs the store (a key's record, a JWT's revocations), one read
        per credential however many requests wait for it."""
        pending = self._pending.get(credential)
        if pending is None:
            pending = asyncio.ensure_future(self._read_store(read, now, previous))
            self._pending[credential] = pending
            pending.add_done_callback(functools.partial(self._read_done, credential))
        # Shielded: a client that goes away must not cancel the read others wait for.
        return await asyncio.shield(pending)

    def _read_done(self, credential: str, future: asyncio.Future[_Decision]) -> None:
        if self._pending.get(credential) is future:
            del self._pending[credential]
        if not future.cancelled():
            future.exception()  # retrieved, even when every waiter went away

    async def _read_store(
        self, read: Callable[[], Awaitable[_Decision]], now: float, previous: _Decision | None
    ) -> _Decision:
        if not self._breaker.allows_call():
            return self._without_store(previous, now)
        try:
            decision = await read()
        except KeyStoreUnavailable as exc:
            if self._breaker.record_failure():
                log.warning("key store unreachable: %s; recent decisions are kept for "
                            "auth.stale_if_error_seconds, other credentials get 503 "
                            "auth_unavailable", exc)  # fmt: skip
            return self._without_store(previous, now)
        if self._breaker.record_success():
            log.warning("key store reachable again")
        return decision

    def _without_store(self, previous: _Decision | None, now: float) -> _Decision:
        """The store is down: the last decision on this credential while it is recent enough
        (auth.stale_if_error_seconds past its freshness), else `unavailable`."""
        if previous is None or now >= previous.fresh_until + self._stale:
            return _Decision(fresh_until=now, unavailable=True)
        if previous.valid_until is not None and self._wall() >= previous.valid_until:
            return _Decision(previous.fresh_until, failure=_EXPIRED_KEY)  # JWTs never get here
        return previous

    async def _decide_key(self, api_key: str, now: float) -> _Decision:
        assert self._store is not None
        record = await self._store.lookup(api_key)
        fresh_until = now + self._ttl
        # Unknown, wrong secret and revoked all read the same: no oracle for which ids exist.
        if record is None or record.revoked is not None:
            return _Decision(fresh_until, failure=_BAD_KEY)
        if record.is_expired(self._wall()):
            return _Decision(fresh_until, failure=_EXPIRED_KEY)
        return _Decision(fresh_until, _key_principal(record), valid_until=record.expires)

    async def _verify_jwt(
        self, token: str, fresh_until: float
    ) -> tuple[_Decision, VerifiedToken | None]:
        if self._jwt is None:
            return _Decision(fresh_until, failure=_NO_JWT), None
        try:
            verified = await self._jwt.verify_async(token)
        except AuthenticationFailed as exc:
            return _Decision(fresh_until, failure=(exc.code or "invalid_token", exc.message)), None
        valid_until = verified.expires + self._jwt_leeway
        return _Decision(fresh_until, verified.principal, valid_until=valid_until), verified

    async def _check_revocations(self, verified: VerifiedToken, now: float) -> _Decision:
        """A verified token, refused when a revocation in the store names its subject (and it
        was issued before that) or its `jti`."""
        assert self._store is not None
        fresh_until = now + self._ttl
        revocations = await self._store.jwt_revocations(verified.subject, verified.token_id)
        if any(r.refuses(verified.issued_at, self._jwt_leeway) for r in revocations):
            return _Decision(fresh_until, failure=_REVOKED_TOKEN)
        valid_until = verified.expires + self._jwt_leeway
        return _Decision(fresh_until, verified.principal, valid_until=valid_until)

    def _note_use(self, key_id: str, now: float) -> None:
        self._last_used[key_id] = self._wall()
        due = now - self._last_flush >= LAST_USED_FLUSH_SECONDS
        if due and (self._flushing is None or self._flushing.done()):
            self._last_flush = now
            self._flushing = asyncio.ensure_future(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        try:
            await self.flush_last_used()
        except Exception:  # a request never pays for bookkeeping; close() flushes again
            log.exception("writing last-use times failed")
