"""JWT keys from an identity provider: a JWKS fetched over HTTPS (from a local provider with a
throwaway CA), kept fresh, refetched for unknown kids at a bounded rate, surviving the provider
going away, swapped by `Authenticator.reconfigure`, and started/stopped with the server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from llmserve.auth.authenticator import Authenticator
from llmserve.auth.jwks import (
    FETCH_TASK_NAME,
    REFRESH_TASK_NAME,
    JwksError,
    cache_lifetime,
    parse_jwks,
)
from llmserve.clock import ManualClock
from llmserve.config import AuthConfig, Config, JwtConfig, MetricsConfig
from llmserve.errors import AuthenticationFailed, ConfigError, ServiceUnavailable
from llmserve.metrics import Metrics
from tests.support.identity_provider import IdentityProvider, public_jwk
from tests.support.tls import TestCA

ALGORITHMS = ["RS256", "ES256", "EdDSA"]


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA.create(tmp_path / "ca", "idp test CA")


@pytest.fixture
async def provider(ca: TestCA) -> AsyncIterator[IdentityProvider]:
    idp = IdentityProvider(ca)
    idp.add_key("r1", "rsa")
    await idp.start()
    yield idp
    await idp.stop()


def jwks_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() in (REFRESH_TASK_NAME, FETCH_TASK_NAME)]


def auth_config(tmp_path: Path, idp: IdentityProvider, **jwt_settings: Any) -> AuthConfig:
    settings: dict[str, Any] = {"algorithms": ALGORITHMS, "jwks_url": idp.jwks_url,
                                "ca_file": idp.ca.cert, "issuer": idp.issuer}  # fmt: skip
    settings.update(jwt_settings)
    return AuthConfig(keys=tmp_path / "keys", jwt=JwtConfig(**settings))


@asynccontextmanager
async def running(config: AuthConfig, **kwargs: Any) -> AsyncIterator[Authenticator]:
    """A started Authenticator without a key store; closed after, with no task left behind."""
    auth = Authenticator(config, None, **kwargs)
    await auth.start()
    try:
        yield auth
    finally:
        await auth.close()
        assert jwks_tasks() == []


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def stats(auth: Authenticator) -> Any:
    found = auth.jwks_stats()
    assert found is not None
    return found


async def fetched(auth: Authenticator, count: int = 1) -> None:
    await until(lambda: stats(auth).refreshes >= count)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def refusal(auth: Authenticator, token: str) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as info:
        await auth.authenticate(bearer(token))
    return info.value


async def unavailable(auth: Authenticator, token: str) -> ServiceUnavailable:
    with pytest.raises(ServiceUnavailable) as info:
        await auth.authenticate(bearer(token))
    return info.value


# -- keys from the JWKS ---------------------------------------------------------------------------


async def test_rsa_ec_and_okp_tokens_signed_by_the_provider_are_accepted(
    tmp_path: Path, provider: IdentityProvider
) -> None:
    provider.add_key("e1", "ec", publish_alg=False)  # no `alg`: ES256 from its curve
    provider.add_key("o1", "ed25519")
    async with running(auth_config(tmp_path, provider)) as auth:
        await fetched(auth)
        assert stats(auth).keys == 3
        for kid, sub in (("r1", "rita"), ("e1", "eve"), ("o1", "otto")):
            principal = await auth.authenticate(bearer(provider.token(kid, sub=sub)))
            assert (principal.id, principal.kind) == (f"jwt:{sub}", "jwt")
        # An ES256 token naming the RSA key's kid: refused for what it is, never a 500.
        ec_as_rsa = provider.token("e1", sub="mallory", header_kid="r1")
        assert (await refusal(auth, ec_as_rsa)).code == "invalid_token"
        # The algorithm-confusion classic: HS256 "signed" with the provider's RSA public key.
        pem = (
            provider.keys["r1"]
            .private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        claims = {"sub": "mallory", "iss": provider.issuer, "exp": int(time.time()) + 60}
        assert (await refusal(auth, hs256_forgery(claims, pem, "r1"))).code == "invalid_token"
    assert provider.requests["/jwks.json"] == 1


def hs256_forgery(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    signing_input = f"{header}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_jwks_parsing_respects_use_alg_and_key_type() -> None:
    from tests.support.identity_provider import new_private_key

    rsa_key, ec_key = new_private_key("rsa"), new_private_key("ec")
    document = {"keys": [
        public_jwk(rsa_key, "sig", "RS256", use="sig"),
        public_jwk(rsa_key, "enc", "RS256", use="enc"),           # encryption key
        public_jwk(rsa_key, "ops", None, key_ops=["encrypt"]),     # not for verifying
        public_jwk(rsa_key, "rs384", "RS384"),                    # alg not configured
        public_jwk(ec_key, "ec-as-rs", "RS256"),                   # alg does not fit the type
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"},
        {**public_jwk(rsa_key, "private", "RS256"), "d": "AQAB"},  # private key material
        public_jwk(rsa_key, "any-rsa", None),                      # no alg: what fits RSA
        public_jwk(ec_key, "any-ec", None),
        "not a key",
    ]}  # fmt: skip
    keys = parse_jwks(document, ["RS256", "PS256", "ES256"])
    assert sorted(k for k in keys if k is not None) == ["any-ec", "any-rsa", "sig"]
    assert keys["sig"][0].algorithms == ("RS256",)
    assert keys["any-rsa"][0].algorithms == ("RS256", "PS256")
    assert keys["any-ec"][0].algorithms == ("ES256",)
    with pytest.raises(JwksError, match="none of its 2 keys"):
        parse_jwks({"keys": document["keys"][1:3]}, ["RS256"])
    with pytest.raises(JwksError, match="not a JWKS"):
        parse_jwks({"key": []}, ["RS256"])


def test_cache_headers_set_the_refresh_time() -> None:
    assert cache_lifetime({"Cache-Control": "public, max-age=600"}, 0.0) == 600.0
    assert cache_lifetime({"Cache-Control": "max-age=600", "Age": "100"}, 0.0) == 500.0
    assert cache_lifetime({"Cache-Control": "no-cache"}, 0.0) == 0.0
    assert cache_lifetime({}, 0.0) is None
    http_date = "Sun, 06 Nov 1994 08:49:37 GMT"
    expires = "Sun, 06 Nov 1994 09:49:37 GMT"
    assert cache_lifetime({"Date": http_date, "Expires": expires}, 0.0) == 3600.0
    assert cache_lifetime({"Expires": "0"}, 0.0) == 0.0


# -- start, refresh, rotation -------------------------------------------------------------------


async def test_until_keys_exist_tokens_get_503_then_the_background_retry_brings_them(
    tmp_path: Path, provider: IdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    provider.status = 503
    caplog.set_level(logging.INFO, "llmserve.auth")
    async with running(auth_config(tmp_path, provider)) as auth:
        await until(lambda: stats(auth).failures >= 1)
        error = await unavailable(auth, provider.token("r1"))
        assert error.code == "auth_unavailable" and int(error.headers["Retry-After"]) >= 1
        assert (await refusal(auth, "not.a.token")).code == "invalid_token"  # needs no key
        assert any(r.levelno == logging.ERROR and "could not be fetched" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        provider.status = 200
        await fetched(auth)  # retried after 1 s, 2 s ...: no restart
        assert (await auth.authenticate(bearer(provider.token("r1")))).id == "jwt:alice"
        assert "fetched again" in caplog.text


async def test_rotation_is_picked_up_by_the_scheduled_refresh(
    tmp_path: Path, provider: IdentityProvider
) -> None:
    provider.cache_control = "max-age=1"  # followed, within jwks_min_refresh_seconds (1 here)
    config = auth_config(tmp_path, provider, jwks_min_refresh_seconds=1)
    async with running(config) as auth:
        await fetched(auth)
        provider.add_key("r2", "rsa")
        await until(lambda: stats(auth).keys == 2, timeout=5)  # no token asked for it
        assert provider.requests["/jwks.json"] >= 2
        assert (await auth.authenticate(bearer(provider.token("r2", sub="bob")))).id == "jwt:bob"
        del provider.keys["r1"]
        await until(lambda: stats(auth).keys == 1, timeout=5)
        assert (await refusal(auth, provider_token_for_removed(provider))).code == "invalid_token"


def provider_token_for_removed(provider: IdentityProvider) -> str:
    """A token naming a kid the provider no longer publishes (r1 was removed)."""
    return provider.token("r2", header_kid="r1", sub="carol")


async def test_rotation_is_picked_up_by_the_unknown_kid_refetch(
    tmp_path: Path, provider: IdentityProvider
) -> None:
    async with running(auth_config(tmp_path, provider)) as auth:  # max-age=300: no refresh soon
        await fetched(auth)
        provider.add_key("r2", "ec")
        principal = await auth.authenticate(bearer(provider.token("r2", sub="dave")))
        assert principal.id == "jwt:dave"
        assert provider.requests["/jwks.json"] == 2


async def test_a_kid_unknown_after_the_refetch_gets_401_invalid_token(
    tmp_path: Path, provider: IdentityProvider
) -> None:
    async with running(auth_config(tmp_path, provider)) as auth:
        await fetched(auth)
        error = await refusal(auth, provider.token("r1", header_kid="nobody-has-this"))
        assert error.code == "invalid_token"
        assert error.headers["WWW-Authenticate"].startswith("Bearer")
        assert provider.requests["/jwks.json"] == 2  # it was looked for once more


async def test_a_flood_of_unknown_kids_costs_one_fetch_per_interval(
    tmp_path: Path, provider: IdentityProvider
) -> None:
    clock = ManualClock(1000.0)
    config = auth_config(tmp_path, provider, jwks_min_refresh_seconds=60)

    def flood(n: int) -> list[str]:
        return [provider.token("r1", header_kid=uuid.uuid4().hex) for _ in range(n)]

    async with running(config, clock=clock) as auth:
        await fetched(auth)
        assert provider.requests["/jwks.json"] == 1
        tokens = flood(200)
        answers = await asyncio.gather(
            *(auth.authenticate(bearer(t)) for t in tokens), return_exceptions=True
        )
        assert all(isinstance(a, AuthenticationFailed) and a.code == "invalid_token"
                   for a in answers)  # fmt: skip
        assert provider.requests["/jwks.json"] == 2  # 200 unknown kids: one refetch
        for token in flood(50):
            assert (await refusal(auth, token)).code == "invalid_token"
        clock.advance(59)
        for token in flood(50):
            await refusal(auth, token)
        assert provider.requests["/jwks.json"] == 2
        clock.advance(1)
        for token in flood(50):
            await refusal(auth, token)
        assert provider.requests["/jwks.json"] == 3  # a minute later: one more


# -- failures -------------------------------------------------------------------------------------


async def test_the_provider_going_away_keeps_the_last_keys_and_counts_failures(
    tmp_path: Path, provider: IdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    provider.cache_control = "max-age=1"
    config = auth_config(tmp_path, provider, jwks_min_refresh_seconds=1)
    caplog.set_level(logging.WARNING, "llmserve.auth")
    async with running(config) as auth:
        metrics = Metrics(CollectorRegistry(), MetricsConfig(), include_default_registry=False,
                          jwks_stats=auth.jwks_stats)  # fmt: skip
        await fetched(auth)
        assert "llmserve_jwks_refresh_failures_total 0.0" in metrics.render()[0].decode()
        await provider.stop()
        await until(lambda: stats(auth).failures >= 2, timeout=8)
        # A token never seen before (not a cached decision), signed with the last good key.
        assert (await auth.authenticate(bearer(provider.token("r1", sub="erin")))).id == "jwt:erin"
        assert stats(auth).keys == 1
        text = metrics.render()[0].decode()
        assert sample(text, "llmserve_jwks_refresh_failures_total") >= 2
        assert 0 < sample(text, "llmserve_jwks_last_success_timestamp_seconds") <= time.time()
        assert "llmserve_jwks_keys 1.0" in text
        assert "could not be refreshed" in caplog.text
        # While it fails, a kid it may have published since is "try again", not "bad token".
        error = await unavailable(auth, provider.token("r1", header_kid="r-new"))
        assert error.code == "auth_unavailable"


def sample(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found is not None, name
    return float(found.group(1))


async def test_a_private_ca_works_with_ca_file_and_is_refused_without_it(
    tmp_path: Path, provider: IdentityProvider
) -> None:
    other_ca = TestCA.create(tmp_path / "other", "another CA")
    for ca_file in (None, other_ca.cert):  # system CAs, a CA that did not sign it
        async with running(auth_config(tmp_path, provider, ca_file=ca_file)) as auth:
            await until(lambda a=auth: stats(a).failures >= 1)
            remote = auth._jwt.remote if auth._jwt is not None else None
            assert remote is not None and "certificate verify failed" in str(remote.last_error)
            assert stats(auth).keys == 0
            assert (await unavailable(auth, provider.token("r1"))).code == "auth_unavailable"
    assert provider.requests["/jwks.json"] == 0  # never served without verified TLS
    async with running(auth_config(tmp_path, provider)) as auth:
        await fetched(auth)
        assert (await auth.authenticate(bearer(provider.token("r1")))).id == "jwt:alice"


async def test_oidc_discovery_finds_the_jwks_and_checks_the_issuer(
    tmp_path: Path, provider: IdentityProvider
) -> None:
    config = auth_config(tmp_path, provider, jwks_url=None, oidc_discovery=True)
    async with running(config) as auth:
        await fetched(auth)
        assert (await auth.authenticate(bearer(provider.token("r1")))).id == "jwt:alice"
    assert provider.requests["/.well-known/openid-configuration"] == 1
    assert provider.requests["/jwks.json"] == 1
    provider.discovery_issuer = "https://impostor.example"
    async with running(config) as auth:
        await until(lambda: stats(auth).failures >= 1)
        remote = auth._jwt.remote if auth._jwt is not None else None
        assert remote is not None and "names the issuer" in str(remote.last_error)
    assert provider.requests["/jwks.json"] == 1  # not fetched from an unverified document


# -- reconfigure -----------------------------------------------------------------------------------


async def test_reconfigure_swaps_the_jwks_source(
    tmp_path: Path, provider: IdentityProvider, ca: TestCA
) -> None:
    second = IdentityProvider(ca, "idp2")
    second.add_key("s1", "ec")
    await second.start()
    clock = ManualClock(1000.0)  # cached decisions never age out: only reconfigure drops them
    try:
        async with running(auth_config(tmp_path, provider), clock=clock) as auth:
            await fetched(auth)
            first_token = provider.token("r1")
            assert (await auth.authenticate(bearer(first_token))).id == "jwt:alice"
            old_remote = auth._jwt.remote if auth._jwt is not None else None
            new_config = auth_config(tmp_path, second, issuer=None)
            await auth.reconfigure(new_config, None)
            assert second.requests["/jwks.json"] == 1  # fetched before the swap
            assert old_remote is not None and old_remote._closed
            assert len([t for t in jwks_tasks() if t.get_name() == REFRESH_TASK_NAME]) == 1
            assert (await auth.authenticate(bearer(second.token("s1")))).id == "jwt:alice"
            assert (await refusal(auth, first_token)).code == "invalid_token"  # cache cleared
            fetches = provider.requests["/jwks.json"]
            # Same source, another setting: the running refresher is kept, nothing refetched.
            before = auth._jwt.remote if auth._jwt is not None else None
            await auth.reconfigure(new_config.model_copy(update={"cache_seconds": 0.2}), None)
            assert auth._jwt is not None and auth._jwt.remote is before
            assert second.requests["/jwks.json"] == 2  # first_token's kid: one refetch
            assert provider.requests["/jwks.json"] == fetches
    finally:
        await second.stop()


async def test_reconfigure_refuses_what_needs_a_restart_or_cannot_be_fetched(
    tmp_path: Path, provider: IdentityProvider
) -> None:
    config = auth_config(tmp_path, provider)
    async with running(config) as auth:
        await fetched(auth)
        with pytest.raises(ConfigError, match=r"auth\.keys"):
            await auth.reconfigure(config.model_copy(update={"keys": tmp_path / "other"}), None)
        with pytest.raises(ConfigError, match=r"auth\.enabled"):
            await auth.reconfigure(config.model_copy(update={"enabled": False}), None)
        dead = auth_config(tmp_path, provider, jwks_url=provider.base_url + "/missing.json")
        with pytest.raises(ConfigError, match=r"could not be fetched.*HTTP 404"):
            await auth.reconfigure(dead, None)
        # Nothing changed: the old source still serves, and only its refresher runs.
        assert (await auth.authenticate(bearer(provider.token("r1")))).id == "jwt:alice"
        assert len([t for t in jwks_tasks() if t.get_name() == REFRESH_TASK_NAME]) == 1
        await auth.reconfigure(AuthConfig(keys=tmp_path / "keys"), None)  # JWTs off
        assert auth.jwks_stats() is None
        assert jwks_tasks() == []
        assert (await refusal(auth, provider.token("r1"))).code == "invalid_token"


# -- the config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "message"), [
    ({"algorithms": ["RS256"], "jwks_url": "https://idp.example/jwks",
      "public_key_file": "/k.pem"}, "public_key_file and jwks_url: set one source"),
    ({"jwks_url": "https://idp.example/jwks"}, r"jwks_url: a key source for RS.*\[RS256\]"),
    ({"algorithms": ["RS256"], "jwks_url": "http://idp.example/jwks"}, "not an https:// URL"),
    ({"algorithms": ["RS256"], "oidc_discovery": True}, "oidc_discovery: needs `issuer`"),
    ({"algorithms": ["RS256"], "oidc_discovery": True, "issuer": "idp.example"},
     "not an https:// URL"),
    ({"algorithms": ["RS256"], "public_key_file": "/k.pem", "ca_file": "/ca.pem"},
     "ca_file: only for fetching keys"),
    ({"algorithms": ["RS256"], "jwks_url": "https://idp.example/jwks", "secret": "s" * 40},
     "secret: only for HS"),
    ({"algorithms": ["RS256"], "jwks_url": "https://idp.example/jwks",
      "jwks_refresh_seconds": 30}, "at least jwks_min_refresh_seconds"),
])  # fmt: skip
def test_the_config_names_one_key_source(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JwtConfig(**settings)


def test_a_ca_file_that_is_not_pem_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    for ca_file, message in ((tmp_path / "ca.pem", "not readable PEM"),
                             (tmp_path / "none.pem", "does not exist")):  # fmt: skip
        config = JwtConfig(algorithms=["RS256"], jwks_url="https://idp.example/j",
                           ca_file=ca_file)  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            Authenticator(AuthConfig(keys=tmp_path / "keys", jwt=config), None)


# -- the server ------------------------------------------------------------------------------------


async def test_the_server_starts_the_refresher_and_stops_it(
    tmp_path: Path, provider: IdentityProvider
) -> None:
    from llmserve.server.components import build_components

    config = Config.model_validate({
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 256},
        "auth": auth_config(tmp_path, provider).model_dump(),
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": str(tmp_path / "usage.jsonl")},
        "server": {"public_metrics": True},
    })  # fmt: skip
    components = build_components(config, registry=CollectorRegistry())
    assert jwks_tasks() == []  # nothing runs before the server starts
    async with TestClient(TestServer(components.app)) as client:
        await until(lambda: provider.requests["/jwks.json"] >= 1)
        ok = await client.get("/v1/models", headers=bearer(provider.token("r1")))
        assert ok.status == 200
        bad = await client.get("/v1/models", headers=bearer(provider.token("r1", header_kid="x")))
        assert bad.status == 401 and (await bad.json())["error"]["code"] == "invalid_token"
        metrics = await (await client.get("/metrics")).text()
        assert "llmserve_jwks_keys 1.0" in metrics
        assert "llmserve_jwks_refreshes_total 2.0" in metrics  # start, and the unknown kid
        assert len(jwks_tasks()) == 1
    assert jwks_tasks() == []  # stopped with the server
