"""JWT verification (for end-user apps) and minting (for `llmserve keys jwt`), with pyjwt.

Algorithm confusion is closed in two places: the config accepts one family only (HMAC or
public-key, never both, see `JwtConfig`), and the key handed to pyjwt is a typed key object
for public-key families, which pyjwt refuses to use as an HMAC secret. `alg: none` is never in
the accepted list. Each public key verifies only the configured algorithms that fit its type
(and its JWK `alg`, when it names one): the token's `alg` header picks among those, never more.

Public keys come from one source: a PEM file, a JWKS file (read at start), or a JWKS fetched
from an identity provider and kept fresh in the background (auth/jwks.py: `jwks_url`, or
`oidc_discovery`). With the latter, `verify_async` refetches the key set (rate-limited) when a
token names a `kid` it lacks, and a JWT gets 503 `auth_unavailable` while no keys are known.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from llmserve.auth.jwks import (
    JwksError,
    JwksRefresher,
    KeySet,
    parse_jwks,
    public_key_algorithms,
)
from llmserve.auth.principal import Principal
from llmserve.config import JwtConfig
from llmserve.errors import (
    AuthenticationFailed,
    ConfigError,
    ServiceUnavailable,
    retry_after_header,
)

JWT_ID_PREFIX = "jwt:"  # principal ids of JWT callers, apart from API key ids


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    principal: Principal
    expires: float  # the `exp` claim, epoch seconds
    subject: str = ""  # the subject claim's value (what `keys jwt-revoke --sub` names)
    token_id: str | None = None  # the `jti` claim, when the token has one
    issued_at: float | None = None  # the `iat` claim, when the token has one


def _is_hmac(algorithms: Iterable[str]) -> bool:
    return any(alg.startswith("HS") for alg in algorithms)


def _read_file(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"auth.jwt.{setting}: cannot read {path}: {exc.strerror}") from None


def _load_public_key(path: Path, algorithms: list[str]) -> tuple[Any, tuple[str, ...]]:
    try:
        key = serialization.load_pem_public_key(_read_file(path, "public_key_file"))
    except (ValueError, TypeError):
        raise ConfigError(f"auth.jwt.public_key_file: {path} is not a PEM public key") from None
    usable = tuple(a for a in algorithms if a in public_key_algorithms(key))
    if not usable:
        raise ConfigError(
            f"auth.jwt.public_key_file: {path} holds a key none of the algorithms {algorithms} "
            "can use (RS*/PS*: RSA; ES256/ES384: EC P-256/P-384; EdDSA: Ed25519/Ed448)"
        )
    return key, usable


def _load_jwks(path: Path, algorithms: list[str]) -> KeySet:
    try:
        return parse_jwks(json.loads(_read_file(path, "jwks_file")), algorithms)
    except (ValueError, JwksError) as exc:
        raise ConfigError(f"auth.jwt.jwks_file: {path} is not a usable JWKS: {exc}") from None


class UnknownKeyId(AuthenticationFailed):
    """The token names a `kid` the key set lacks (a 401 `invalid_token`, unless a refetch of a
    JWKS URL finds it)."""

    def __init__(self, kid: str | None) -> None:
        super().__init__("The token's signing key is not known.", code="invalid_token",
                         headers=_CHALLENGE)  # fmt: skip
        self.kid = kid


def keys_unavailable(retry_in: float) -> ServiceUnavailable:
    return ServiceUnavailable(
        "Tokens cannot be checked right now (the identity provider's keys could not be "
        "fetched); retry shortly.",
        code="auth_unavailable",
        headers=retry_after_header(retry_in),
    )


class JwtVerifier:
    """Turns a bearer JWT into a Principal, or raises AuthenticationFailed (or, with a JWKS
    URL whose keys are not available, ServiceUnavailable)."""

    def __init__(
        self,
        config: JwtConfig,
        known_tiers: Iterable[str] | None = None,
        *,
        jwks: JwksRefresher | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`jwks`: a running refresher of the same source to use (a reconfigure that keeps the
        source), else one is made when the config names a JWKS URL; its owner starts and closes
        it (`remote`)."""
        self._config = config
        self._algorithms: list[str] = list(config.algorithms)
        self._known_tiers = frozenset(known_tiers) if known_tiers is not None else None
        self._key: Any = None
        self._key_algorithms: list[str] = self._algorithms
        self._jwks: KeySet = {}
        self.remote: JwksRefresher | None = None
        if _is_hmac(self._algorithms):
            if config.secret is None:
                raise ConfigError("auth.jwt.secret: required for HS* algorithms")
            self._key = config.secret.get_secret_value()
        elif config.jwks_url is not None or config.oidc_discovery:
            self.remote = jwks or JwksRefresher(config, clock=clock, wall_clock=wall_clock)
        elif config.jwks_file is not None:
            self._jwks = _load_jwks(config.jwks_file, self._algorithms)
        elif config.public_key_file is not None:
            self._key, usable = _load_public_key(config.public_key_file, self._algorithms)
            self._key_algorithms = list(usable)
        else:
            raise ConfigError(
                "auth.jwt: RS*/ES*/PS*/EdDSA need one source of public keys: public_key_file "
                "or jwks_file, jwks_url, or oidc_discovery (with issuer)"
            )
        required = ["exp"]
        required += ["iat"] if config.max_lifetime_seconds is not None else []
        required += ["iss"] if config.issuer else []
        required += ["aud"] if config.audience else []
        self._options: Any = {"require": required, "verify_aud": config.audience is not None}

    async def verify_async(self, token: str) -> VerifiedToken:
        """`verify`, and with a JWKS URL: a token naming a `kid` the keys lack waits for one
        refetch (at most one per jwks_min_refresh_seconds for all tokens), then is verified
        again; while the provider is failing it gets 503 rather than 401."""
        try:
            return self.verify(token)
        except UnknownKeyId as exc:
            remote = self.remote
            if remote is None or exc.kid is None:
                raise
            if await remote.refetch_for(exc.kid):
                return self.verify(token)
            if remote.failing:
                raise keys_unavailable(remote.retry_in()) from None
            raise

    def verify(self, token: str) -> VerifiedToken:
        """The verified token, from the keys known now (no fetch)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _failure(exc) from None
        if header.get("alg") not in self._algorithms:  # before any key: needs none to say so
            raise _failure(jwt.InvalidAlgorithmError())
        key, algorithms = self._key_for(header)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                options=self._options,
                audience=self._config.audience,
                issuer=self._config.issuer,
                leeway=self._config.leeway_seconds,
            )
        except jwt.PyJWTError as exc:
            raise _failure(exc) from None
        _check_numeric_claims(claims)
        issued_at = float(claims["iat"]) if "iat" in claims else None
        limit = self._config.max_lifetime_seconds
        if limit is not None and issued_at is not None and claims["exp"] - issued_at > limit:
            raise _invalid("The token's lifetime (exp - iat) is longer than this server accepts.")
        principal = self._principal(claims)
        return VerifiedToken(
            principal,
            float(claims["exp"]),
            subject=principal.id.removeprefix(JWT_ID_PREFIX),
            token_id=_token_id(claims.get("jti")),
            issued_at=issued_at,
        )

    def _key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        """The key and the algorithms it may verify, for a header whose `alg` is accepted."""
        if self.remote is None and not self._jwks:
            if header["alg"] not in self._key_algorithms:
                raise _failure(jwt.InvalidAlgorithmError())
            return self._key, self._key_algorithms
        keys = self._jwks if self.remote is None else self.remote.keys
        if not keys and self.remote is not None:  # nothing fetched yet: the token may be fine
            raise keys_unavailable(self.remote.retry_in())
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("The token's 'kid' header must be a string.")
        entries = keys.get(kid)
        if entries is None and kid is None and len(keys) == 1:
            entries = next(iter(keys.values()))  # one key, and a token that names none
        if entries is None:
            raise UnknownKeyId(kid)
        for entry in entries:
            if header["alg"] in entry.algorithms:
                return entry.key, [header["alg"]]
        raise _failure(jwt.InvalidAlgorithmError())  # e.g. an RS256 token for an EC key

    def _principal(self, claims: dict[str, Any]) -> Principal:
        cfg = self._config
        subject = claims.get(cfg.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise _invalid(f"The token has no {cfg.subject_claim!r} claim naming the caller.")
        tier = claims.get(cfg.tier_claim)
        if tier is not None and not isinstance(tier, str):
            raise _invalid(f"The {cfg.tier_claim!r} claim must be a string.")
        if tier is not None and self._known_tiers is not None and tier not in self._known_tiers:
            raise _invalid(f"The {cfg.tier_claim!r} claim names a tier this server lacks.")
        if tier is not None and cfg.allowed_tiers is not None and tier not in cfg.allowed_tiers:
            raise _invalid(f"The {cfg.tier_claim!r} claim names a tier tokens may not claim.")
        return Principal(
            id=JWT_ID_PREFIX + subject,
            tier=tier,
            models=_models(claims.get(cfg.models_claim), cfg.models_claim),
            kind="jwt",
            admin=bool(cfg.admin_claim and claims.get(cfg.admin_claim) is True),
        )


def _check_numeric_claims(claims: dict[str, Any]) -> None:
    """exp, nbf and iat are NumericDate (RFC 7519): numbers, never strings that look like one
    (pyjwt converts "9999999999" for its own check, so a string would pass it)."""
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _invalid(f"The {name!r} claim must be a number (seconds since the epoch).")


def _token_id(value: Any) -> str | None:
    """The `jti` claim as text (RFC 7519 makes it a string; a number is taken as its digits)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _models(value: Any, claim: str) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):  # OAuth-scope style: "a b" or "a,b"
        return frozenset(value.replace(",", " ").split())
    if isinstance(value, list) and all(isinstance(m, str) for m in value):
        return frozenset(value)
    raise _invalid(f"The {claim!r} claim must be a list of model names.")


def _invalid(message: str) -> AuthenticationFailed:
    return AuthenticationFailed(message, code="invalid_token", headers=_CHALLENGE)


_CHALLENGE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}

# pyjwt's own messages can quote claim values; ours name the problem and nothing else.
_MESSAGES: list[tuple[type[jwt.PyJWTError], str, str]] = [
    (jwt.ExpiredSignatureError, "token_expired", "The token has expired."),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "The token is not valid yet (nbf/iat)."),
    (jwt.InvalidSignatureError, "invalid_token", "The token signature does not verify."),
    (jwt.InvalidAlgorithmError, "invalid_token", "The token's algorithm is not accepted."),
    (jwt.InvalidIssuerError, "invalid_token", "The token's issuer is not accepted."),
    (jwt.InvalidAudienceError, "invalid_token", "The token's audience is not accepted."),
    (jwt.InvalidKeyError, "invalid_token", "The token's signing key is not known."),
]


def _failure(exc: jwt.PyJWTError) -> AuthenticationFailed:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        message = f"The token lacks the required {exc.claim!r} claim."
        return AuthenticationFailed(message, code="invalid_token", headers=_CHALLENGE)
    for kind, code, message in _MESSAGES:
        if isinstance(exc, kind):
            return AuthenticationFailed(message, code=code, headers=_CHALLENGE)
    return _invalid("The token is malformed.")


# ---------------------------------------------------------------------------------------------
# Minting (test tokens for operators; production tokens come from the app's identity provider)


def mint_token(
    config: JwtConfig,
    subject: str,
    *,
    tier: str | None = None,
    models: Iterable[str] | None = None,
    ttl_seconds: float = 3600.0,
    now: float | None = None,
    token_id: str | None = None,
) -> str:
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        config.subject_claim: subject,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_seconds),
        "jti": token_id or secrets.token_hex(8),  # so `keys jwt-revoke --jti` can name it
    }
    if tier is not None:
        claims[config.tier_claim] = tier
    if models is not None:
        claims[config.models_claim] = list(models)
    if config.issuer:
        claims["iss"] = config.issuer
    if config.audience:
        claims["aud"] = config.audience
    algorithm = config.algorithms[0]
    return jwt.encode(claims, _signing_key(config), algorithm=algorithm)


def _signing_key(config: JwtConfig) -> Any:
    if _is_hmac(config.algorithms):
        if config.secret is None:
            raise ConfigError("auth.jwt.secret: required to mint HS* tokens")
        return config.secret.get_secret_value()
    if config.private_key_file is None:
        raise ConfigError("auth.jwt.private_key_file: required to mint RS/ES/PS tokens")
    try:
        pem = _read_file(config.private_key_file, "private_key_file")
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"auth.jwt.private_key_file: {config.private_key_file} is not an unencrypted PEM "
            "private key"
        ) from None


def describe_claims(token: str) -> str:
    """The unverified claims of a token, for printing next to a freshly minted one."""
    return json.dumps(jwt.decode(token, options={"verify_signature": False}), sort_keys=True)
