"""Verification keys for JWTs from an identity provider: a JWKS fetched over HTTPS, kept fresh.

`auth.jwt.jwks_url` names the JWKS; with `auth.jwt.oidc_discovery` its URL is the `jwks_uri` of
`{issuer}/.well-known/openid-configuration` (whose `issuer` must be the configured one). One
`JwksRefresher` per source:

- **At start** the first fetch begins at once, in the background: the server starts whether or
  not the provider answers. Until a key set has arrived, a JWT gets 503 `auth_unavailable` with
  Retry-After (never a 401: the token may be fine); API keys are not affected.
- **Refresh**: again after the response's Cache-Control `max-age` (or `Expires`), bounded by
  `jwks_min_refresh_seconds` .. 24 h; `jwks_refresh_seconds` when the response says nothing.
- **Unknown `kid`**: a token naming a key the set lacks causes one refetch, at most one such
  refetch per `jwks_min_refresh_seconds` however many tokens ask (concurrent ones share it);
  then the token is verified again, or refused with 401 `invalid_token`.
- **Failures** (unreachable, TLS, an HTTP error, a document that is not a usable JWKS) keep the
  last good keys in use, are retried after 1, 2, 4 ... s up to `jwks_min_refresh_seconds`, are
  logged once per outage (and the recovery after), and counted in `JwksStats` (exported as
  `llmserve_jwks_*`). While the provider is failing, a token naming an unknown `kid` gets 503:
  its key may be one the provider published since.

TLS is always verified: against `auth.jwt.ca_file` when set (a private CA; then only those
certificates), else the system's CAs. Redirects are not followed, so a fetch never leaves the
configured https URL. Proxies come from HTTPS_PROXY / NO_PROXY, as for any aiohttp client.

Keys: RSA, EC (P-256/384/521) and OKP (Ed25519/Ed448) public keys for signatures. A key's own
`alg` limits it to that algorithm; a key without one may verify the configured algorithms its
type fits. `use` other than `sig`, `key_ops` without `verify`, symmetric (`oct`) and private keys
are skipped. A token is only ever verified with the configured `algorithms`: its own `alg`
header chooses among them, never beyond.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from llmserve import __version__
from llmserve.config import JWKS_MAX_REFRESH_SECONDS, JwtConfig
from llmserve.errors import ConfigError

log = logging.getLogger("llmserve.auth")

FETCH_TIMEOUT_SECONDS = 10.0  # one whole fetch (connect, TLS, body)
MAX_DOCUMENT_BYTES = 1 << 20  # a JWKS is a few KiB; anything near this is not one
RETRY_FIRST_SECONDS = 1.0  # after a failure: 1, 2, 4 ... s, up to jwks_min_refresh_seconds
DISCOVERY_PATH = "/.well-known/openid-configuration"
REFRESH_TASK_NAME = "llmserve-jwks-refresh"
FETCH_TASK_NAME = "llmserve-jwks-fetch"

_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGORITHMS = {"P-256": ("ES256",), "P-384": ("ES384",), "P-521": ("ES512",)}
_EC_CURVES = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",)}
_OKP_ALGORITHMS = {"Ed25519": ("EdDSA",), "Ed448": ("EdDSA",)}


@dataclass(frozen=True, slots=True)
class VerificationKey:
    key: Any  # a `cryptography` public key object (never a str or bytes: no HMAC confusion)
    algorithms: tuple[str, ...]  # the configured algorithms this key may verify


KeySet = Mapping[str | None, tuple[VerificationKey, ...]]  # by `kid` (None: a key without one)


@dataclass(slots=True)
class JwksStats:
    """What `llmserve_jwks_*` exports, read at scrape time."""

    refreshes: int = 0  # fetches that brought a usable key set
    failures: int = 0  # fetches that did not (the last good keys stayed in use)
    last_success: float | None = None  # wall clock of the last good fetch
    keys: int = 0  # verification keys in use


class JwksError(Exception):
    """A JWKS or discovery document that cannot be fetched or used; the message says why."""


# -- parsing ----------------------------------------------------------------------------------


def key_type_algorithms(jwk: Mapping[str, Any]) -> tuple[str, ...]:
    """The algorithms a JWK's type (and curve) can verify; none for `oct`: a shared secret
    published in a key set is never a verification key here."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return _RSA_ALGORITHMS
    if kty == "EC" and isinstance(crv, str):
        return _EC_ALGORITHMS.get(crv, ())
    if kty == "OKP" and isinstance(crv, str):
        return _OKP_ALGORITHMS.get(crv, ())
    return ()


def public_key_algorithms(key: Any) -> tuple[str, ...]:
    """The algorithms a loaded public key (a PEM file) can verify."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_CURVES.get(key.curve.name, ())
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    return ()


def _usable_algorithms(jwk: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(jwk, dict) or "d" in jwk:  # private key material: not in a key set
        return ()
    use, ops = jwk.get("use"), jwk.get("key_ops")
    if use is not None and use != "sig":
        return ()
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return ()
    fits = key_type_algorithms(jwk)
    alg = jwk.get("alg")
    if alg is not None:
        return (alg,) if alg in fits and alg in allowed else ()
    return tuple(a for a in allowed if a in fits)


def parse_jwks(
    document: Any, algorithms: Iterable[str]
) -> dict[str | None, tuple[VerificationKey, ...]]:
    """The keys of a JWKS document that can verify tokens signed with one of `algorithms`.
    Other keys are skipped; a document with no usable key at all is a JwksError."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError('not a JWKS (a JSON object with a "keys" list)')
    allowed = tuple(algorithms)
    found: dict[str | None, list[VerificationKey]] = {}
    total = len(document["keys"])
    for jwk in document["keys"]:
        usable = _usable_algorithms(jwk, allowed)
        kid = jwk.get("kid") if usable else None
        if not usable or not (kid is None or isinstance(kid, str)):
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm=usable[0]).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue  # malformed numbers, an unknown curve ...
        found.setdefault(kid, []).append(VerificationKey(key, usable))
    if not found:
        raise JwksError(
            f"none of its {total} keys can verify {list(allowed)} tokens (keys of another type "
            "or `alg`, not for signatures, private or malformed are skipped)"
        )
    return {kid: tuple(keys) for kid, keys in found.items()}


def key_count(keys: KeySet) -> int:
    return sum(len(entries) for entries in keys.values())


def cache_lifetime(headers: Mapping[str, str], now: float) -> float | None:
    """How long a response may be used, from Cache-Control (`max-age` less `Age`; `no-cache` and
    `no-store` count as 0), else `Expires` against `Date`; None when the headers say nothing."""
    directives: dict[str, str] = {}
    for part in headers.get("Cache-Control", "").split(","):
        name, _, value = part.strip().partition("=")
        directives[name.strip().lower()] = value.strip().strip('"')
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    if "max-age" in directives:
        try:
            max_age = float(int(directives["max-age"]))
        except ValueError:
            return None
        try:
            age = float(int(headers.get("Age", "0")))
        except ValueError:
            age = 0.0
        return max(0.0, max_age - age)
    expires = _http_date(headers.get("Expires"))
    if expires is None:
        return 0.0 if "Expires" in headers else None  # an invalid Expires means "expired"
    sent = _http_date(headers.get("Date"))
    return max(0.0, expires - (sent if sent is not None else now))


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verification always on: the system's CAs, or only those of `ca_file`."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except FileNotFoundError:
        raise ConfigError(f"auth.jwt.ca_file: {ca_file} does not exist") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"auth.jwt.ca_file: {ca_file} is not readable PEM CA certificates: {exc}"
        ) from None


def jwks_settings(config: JwtConfig) -> tuple[Any, ...] | None:
    """What a refresher depends on: two configs with equal settings can share one."""
    if config.jwks_url is None and not config.oidc_discovery:
        return None
    return (config.jwks_url, config.oidc_discovery, config.issuer if config.oidc_discovery
            else None, config.ca_file, tuple(config.algorithms), config.jwks_refresh_seconds,
            config.jwks_min_refresh_seconds)  # fmt: skip


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no complete answer within {FETCH_TIMEOUT_SECONDS:g} s"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, JwksError) else f"{type(exc).__name__}: {text}"


# -- fetching ---------------------------------------------------------------------------------


class JwksRefresher:
    """The key set of one JWKS source, fetched by a background task between `start()` and
    `close()`. Everything here runs on the event loop's thread."""

    def __init__(
        self,
        config: JwtConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        settings = jwks_settings(config)
        if settings is None:
            raise ValueError("JwksRefresher: auth.jwt has no jwks_url or oidc_discovery")
        self.settings = settings
        self._issuer = config.issuer if config.oidc_discovery else None
        self.source = config.jwks_url or f"{config.issuer} (OIDC discovery)"
        self._jwks_uri: str | None = config.jwks_url  # with discovery: found at the first fetch
        self._discovered_at = -math.inf
        self._algorithms = tuple(config.algorithms)
        self._refresh = config.jwks_refresh_seconds
        self._min_interval = config.jwks_min_refresh_seconds
        self._tls = tls_context(config.ca_file)  # a bad ca_file is a ConfigError now, not later
        self._clock, self._wall = clock, wall_clock
        self.keys: KeySet = {}
        self.stats = JwksStats()
        self.last_error: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._fetch_task: asyncio.Task[bool] | None = None
        self._wake: asyncio.Future[None] | None = None  # the background task's sleep
        self._next_due = -math.inf  # monotonic: when the background task fetches next
        self._last_refetch = -math.inf  # monotonic: the last refetch for an unknown kid
        self._failures_in_a_row = 0
        self._closed = False

    @property
    def failing(self) -> bool:
        """The last fetch failed (the keys in use, if any, are older than they should be)."""
        return self._failures_in_a_row > 0

    def retry_in(self) -> float:
        """Seconds until the next fetch (for Retry-After), between 1 and the min interval."""
        return min(max(self._next_due - self._clock(), 1.0), self._min_interval)

    async def start(self, *, wait_for_first: bool = False) -> bool:
        """Open the HTTP client and start the background task (its first fetch at once). With
        `wait_for_first`, fetch once before returning: whether that fetch brought keys."""
        if self._session is not None or self._closed:
            raise RuntimeError("a JwksRefresher starts once")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._tls),
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS),
            headers={"Accept": "application/json", "User-Agent": f"llmserve/{__version__}"},
            trust_env=True,  # HTTPS_PROXY / NO_PROXY
        )
        fetched = await self._fetch_shared() if wait_for_first else False
        if not self._closed:
            self._loop_task = asyncio.create_task(self._run(), name=REFRESH_TASK_NAME)
        return fetched

    async def close(self) -> None:
        """Stop fetching; no task of this refresher is left when this returns."""
        self._closed = True
        tasks = [t for t in (self._loop_task, self._fetch_task) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._session is not None:
            await self._session.close()

    async def refetch_for(self, kid: str) -> bool:
        """Whether `kid` is in the key set, after waiting for a fetch in flight and, when none
        has been made for an unknown kid within `jwks_min_refresh_seconds`, one refetch."""
        if kid in self.keys:
            return True
        if self._session is None or self._closed:
            return False
        task = self._fetch_task
        if task is not None and not task.done():
            await asyncio.wait({task})  # never cancels the fetch others wait for
            if kid in self.keys:
                return True
        now = self._clock()
        if now - self._last_refetch < self._min_interval:
            return False  # a flood of unknown kids costs the provider one fetch per interval
        self._last_refetch = now
        log.info("JWTs name key %r, not in the JWKS %s: fetching it again", kid[:80], self.source)
        await self._fetch_shared()
        return kid in self.keys

    # -- internals ----------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = self._next_due - self._clock()
            if delay > 0:
                # A plain future: cancelled cleanly by close(), woken early by any fetch.
                wake = self._wake = loop.create_future()
                timer = loop.call_later(delay, self._wake_up)
                try:
                    await wake
                finally:
                    timer.cancel()
                continue  # due now, or a refetch moved the schedule: look again
            await self._fetch_shared()

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _fetch_shared(self) -> bool:
        """One fetch at a time: a caller arriving during one waits for it."""
        task = self._fetch_task
        if task is None or task.done():
            if self._closed:
                return False  # nothing starts once close() has begun
            task = self._fetch_task = asyncio.create_task(self._fetch(), name=FETCH_TASK_NAME)
        await asyncio.wait({task})
        return not task.cancelled() and task.result()

    async def _fetch(self) -> bool:
        try:
            keys, lifetime = await self._download()
        except Exception as exc:  # never lets the background task die: counted, retried
            reason = _describe(exc)  # a JwksError names its URL
            self._failed(reason if isinstance(exc, JwksError) else f"{self.source}: {reason}")
            return False
        else:
            self._succeeded(keys, lifetime)
            return True
        finally:
            self._wake_up()  # the background task looks at the new schedule

    async def _download(self) -> tuple[KeySet, float | None]:
        if self._issuer is not None and (
            self._jwks_uri is None
            or self._clock() - self._discovered_at >= JWKS_MAX_REFRESH_SECONDS
        ):
            self._jwks_uri = await self._discover(self._issuer)
            self._discovered_at = self._clock()
        assert self._jwks_uri is not None
        document, lifetime = await self._get_json(self._jwks_uri)
        try:
            return parse_jwks(document, self._algorithms), lifetime
        except JwksError as exc:
            raise JwksError(f"{self._jwks_uri}: {exc}") from None

    async def _discover(self, issuer: str) -> str:
        url = issuer.rstrip("/") + DISCOVERY_PATH
        document, _ = await self._get_json(url)
        if not isinstance(document, dict):
            raise JwksError(f"{url}: not an OpenID provider configuration (a JSON object)")
        if document.get("issuer") != issuer:
            raise JwksError(
                f"{url}: names the issuer {document.get('issuer')!r}, not auth.jwt.issuer "
                f"{issuer!r} (they must match exactly)"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
            raise JwksError(f"{url}: jwks_uri {jwks_uri!r} is not an https:// URL")
        return jwks_uri

    async def _get_json(self, url: str) -> tuple[Any, float | None]:
        assert self._session is not None
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    location = response.headers.get("Location")
                    redirect = location and 300 <= response.status < 400
                    hint = f" (a redirect to {location}: configure that URL)" if redirect else ""
                    raise JwksError(f"{url}: HTTP {response.status}{hint}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise JwksError(f"{url}: larger than {MAX_DOCUMENT_BYTES} bytes")
                lifetime = cache_lifetime(response.headers, self._wall())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise JwksError(f"{url}: {_describe(exc)}") from None
        try:
            return json.loads(body), lifetime
        except ValueError:
            raise JwksError(f"{url}: not JSON") from None

    def _failed(self, reason: str) -> None:
        self.stats.failures += 1
        self.last_error = reason
        self._failures_in_a_row += 1
        backoff = RETRY_FIRST_SECONDS * 2 ** min(self._failures_in_a_row - 1, 30)
        self._next_due = self._clock() + min(backoff, self._min_interval)
        if self._issuer is not None:
            self._jwks_uri = None  # the provider may have moved it: discover again
        if self._failures_in_a_row > 1:
            log.debug("JWKS still not fetched (%s)", reason)
        elif not self.keys:
            log.error(
                "JWKS could not be fetched (%s): JWTs get 503 auth_unavailable until it is; "
                "retrying in the background", reason,
            )  # fmt: skip
        else:
            age = self._wall() - (self.stats.last_success or self._wall())
            log.warning(
                "JWKS could not be refreshed (%s): the last good keys (%d, fetched %.0f s ago) "
                "stay in use; retrying in the background", reason, key_count(self.keys), age,
            )  # fmt: skip

    def _succeeded(self, keys: KeySet, lifetime: float | None) -> None:
        failures, before = self._failures_in_a_row, set(self.keys)
        self.keys = keys
        self.last_error = None
        self._failures_in_a_row = 0
        self.stats.refreshes += 1
        self.stats.last_success = self._wall()
        self.stats.keys = key_count(keys)
        wait = self._refresh if lifetime is None else lifetime
        self._next_due = self._clock() + min(max(wait, self._min_interval),
                                             JWKS_MAX_REFRESH_SECONDS)  # fmt: skip
        if failures:
            log.warning("JWKS %s fetched again, after %d failed attempts", self.source, failures)
        if set(keys) != before:
            kids = ", ".join(sorted(repr(k) for k in keys))
            log.info("JWKS %s: %d keys in use (kid %s)", self.source, self.stats.keys, kids)
