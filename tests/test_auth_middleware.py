"""The attack table of issue 4, through a minimal aiohttp app: status, code, and no secret leaked.

The app here is the auth middleware, a tiny handler and a tiny error renderer of this file's own,
so these tests hold whatever the real server's other layers do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from llmserve.auth.authenticator import Authenticator
from llmserve.auth.keys import KeyStore
from llmserve.auth.permissions import ensure_model_allowed
from llmserve.auth.redact import RedactSecretsFilter, redact
from llmserve.config import AuthConfig, JwtConfig, ServerConfig
from llmserve.errors import APIError
from llmserve.middleware.auth import auth_middleware, request_principal

ISSUER, AUDIENCE = "https://id.example.test", "llmserve"
HS_SECRET = "hs-secret-" + "q" * 40


@web.middleware
async def render_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


async def whoami(request: web.Request) -> web.Response:
    p = request_principal(request)
    return web.json_response({"id": p.id, "kind": p.kind, "tier": p.tier})


async def chat(request: web.Request) -> web.Response:
    body = await request.json()
    ensure_model_allowed(request_principal(request), body["model"])
    return web.json_response({"ok": True})


async def plain(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(
    auth: Authenticator, server: ServerConfig | None = None, **handler_args: int
) -> web.Application:
    middlewares = [render_errors, auth_middleware(auth, server or ServerConfig())]
    app = web.Application(middlewares=middlewares, handler_args=handler_args or None)
    app.router.add_get("/v1/models", whoami)
    app.router.add_post("/v1/chat/completions", chat)
    for path in ("/health", "/ready", "/metrics"):
        app.router.add_get(path, plain)
    return app


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    base = {"sub": "user-1", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600}
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


@dataclass
class World:
    keys: dict[str, str]  # label -> API key
    private_pem: bytes
    public_pem: bytes
    store: KeyStore

    def rs(self, **overrides: object) -> str:
        return jwt.encode(claims(**overrides), self.private_pem, algorithm="RS256")


@pytest.fixture(scope="module")
def rsa_pems() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.fixture
def world(tmp_path: Path, rsa_pems: tuple[bytes, bytes]) -> World:
    store = KeyStore(tmp_path / "keys")
    keys = {
        "valid": store.create("ok", models=["allowed-model"])[1],
        "admin": store.create("ops", admin=True)[1],
        "expired": store.create("old", expires=time.time() - 5)[1],
    }
    revoked_record, keys["revoked"] = store.create("gone")
    store.revoke(revoked_record.id)
    (tmp_path / "rs.pub").write_bytes(rsa_pems[1])
    yield World(keys, rsa_pems[0], rsa_pems[1], store)
    store.close()


@pytest.fixture
def rs_auth(world: World, tmp_path: Path) -> Authenticator:
    jwt_config = JwtConfig(
        algorithms=["RS256"], public_key_file=tmp_path / "rs.pub", issuer=ISSUER,
        audience=AUDIENCE, leeway_seconds=5,
    )  # fmt: skip
    return Authenticator(AuthConfig(keys=tmp_path / "keys", jwt=jwt_config), world.store)


def forged_hs256_with_public_key(world: World) -> str:
    # The classic confusion attack: sign HS256 with the RSA public key as the HMAC secret.
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims()).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(world.public_pem, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def alg_none(world: World) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims()).encode())}."


def bad_signature(world: World) -> str:
    head, body, sig = world.rs().split(".")
    flipped = "A" if sig[5] != "A" else "B"
    return f"{head}.{body}.{sig[:5]}{flipped}{sig[6:]}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# name -> (headers from the world, request body model, status, code)
ATTACKS: dict[str, tuple[Callable[[World], dict[str, str]], int, str]] = {
    "no credentials": (lambda w: {}, 401, "missing_api_key"),
    "empty header": (lambda w: {"Authorization": ""}, 401, "missing_api_key"),
    "bearer without value": (lambda w: {"Authorization": "Bearer "}, 401, "missing_api_key"),
    "wrong scheme": (
        lambda w: {"Authorization": "Basic " + b64url(w.keys["valid"].encode())},
        401, "invalid_authorization_header",
    ),
    "unknown key": (lambda w: bearer("sk-llms-0123456789ab-" + "k" * 43), 401, "invalid_api_key"),
    "wrong secret for a real id": (
        lambda w: bearer(w.keys["valid"][:-4] + "AAAA"), 401, "invalid_api_key",
    ),
    "revoked key": (lambda w: bearer(w.keys["revoked"]), 401, "invalid_api_key"),
    "revoked key in X-API-Key": (
        lambda w: {"X-API-Key": w.keys["revoked"]}, 401, "invalid_api_key",
    ),
    "expired key": (lambda w: bearer(w.keys["expired"]), 401, "api_key_expired"),
    "key for another model": (lambda w: bearer(w.keys["valid"]), 403, "model_not_allowed"),
    "jwt bad signature": (lambda w: bearer(bad_signature(w)), 401, "invalid_token"),
    "jwt alg none": (lambda w: bearer(alg_none(w)), 401, "invalid_token"),
    "jwt hs256 signed with the rs256 public key": (
        lambda w: bearer(forged_hs256_with_public_key(w)), 401, "invalid_token",
    ),
    "jwt expired": (lambda w: bearer(w.rs(exp=int(time.time()) - 60)), 401, "token_expired"),
    "jwt not yet valid": (
        lambda w: bearer(w.rs(nbf=int(time.time()) + 60)), 401, "token_not_yet_valid",
    ),
    "jwt wrong issuer": (lambda w: bearer(w.rs(iss="https://evil.test")), 401, "invalid_token"),
    "jwt wrong audience": (lambda w: bearer(w.rs(aud="someone-else")), 401, "invalid_token"),
    "jwt missing exp": (lambda w: bearer(w.rs(exp=None)), 401, "invalid_token"),
    "garbage token": (lambda w: bearer("eyJhbGciOi.%%%garbage.###"), 401, "invalid_token"),
    "garbage non-token": (lambda w: bearer("hello world"), 401, "invalid_api_key"),
}  # fmt: skip


def secrets_of(world: World, headers: dict[str, str]) -> list[str]:
    values = [v.split(" ", 1)[-1] for v in headers.values() if len(v) > 8]
    key_parts = [k.split("-", 3)[3] for k in world.keys.values()]
    return [*values, *key_parts, HS_SECRET, world.private_pem.decode()[30:80]]


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_attack_is_refused_with_its_code_and_no_secret(
    name: str, world: World, rs_auth: Authenticator, aiohttp_client
) -> None:
    make_headers, status, code = ATTACKS[name]
    headers = make_headers(world)
    client = await aiohttp_client(make_app(rs_auth))
    response = await client.post(
        "/v1/chat/completions", json={"model": "other-model"}, headers=headers
    )
    text = await response.text()
    assert response.status == status, text
    error = json.loads(text)["error"]
    assert error["code"] == code
    assert error["type"] == ("authentication_error" if status == 401 else "permission_error")
    for secret in secrets_of(world, headers):
        assert secret not in text
        assert all(secret not in value for value in response.headers.values())
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_valid_key_and_valid_jwt_pass(world: World, rs_auth: Authenticator, aiohttp_client):
    client = await aiohttp_client(make_app(rs_auth))
    for headers, kind in ((bearer(world.keys["valid"]), "key"), (bearer(world.rs()), "jwt")):
        response = await client.get("/v1/models", headers=headers)
        assert response.status == 200
        assert (await response.json())["kind"] == kind
    allowed = await client.post(
        "/v1/chat/completions", json={"model": "allowed-model"}, headers=bearer(world.keys["valid"])
    )
    assert allowed.status == 200


async def test_hs256_app_refuses_a_token_signed_with_another_secret(
    world: World, aiohttp_client
) -> None:
    config = JwtConfig(algorithms=["HS256"], secret=SecretStr(HS_SECRET))
    auth = Authenticator(AuthConfig(keys=world.store.directory, jwt=config), world.store)
    client = await aiohttp_client(make_app(auth))
    good = jwt.encode(claims(aud=None, iss=None), HS_SECRET, algorithm="HS256")
    assert (await client.get("/v1/models", headers=bearer(good))).status == 200
    forged = jwt.encode(claims(aud=None, iss=None), "x" * 50, algorithm="HS256")
    response = await client.get("/v1/models", headers=bearer(forged))
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_token"
    rs_token = world.rs(aud=None, iss=None)  # a public-key token at an HMAC-only server
    assert (await client.get("/v1/models", headers=bearer(rs_token))).status == 401


async def test_100kb_header_is_refused_without_echo(world: World, rs_auth, aiohttp_client) -> None:
    # aiohttp's parser refuses fields over 8190 bytes with a 400 before any middleware runs.
    client = await aiohttp_client(make_app(rs_auth))
    response = await client.get("/v1/models", headers=bearer("Z" * 100_000))
    assert response.status == 400
    assert "Z" * 200 not in await response.text()


async def test_100kb_header_with_a_raised_field_limit_is_a_401_without_echo(
    world: World, rs_auth: Authenticator, aiohttp_client
) -> None:
    # aiohttp's own 400 quotes the first 100 bytes of an oversized header (so a real key
    # followed by padding would be echoed and logged); with max_field_size raised, the request
    # reaches the authenticator, which refuses it without quoting anything.
    client = await aiohttp_client(make_app(rs_auth, max_field_size=256 * 1024))
    padded = world.keys["valid"] + "A" * 100_000
    response = await client.get("/v1/models", headers=bearer(padded))
    text = await response.text()
    assert response.status == 401
    assert json.loads(text)["error"]["code"] == "invalid_api_key"
    assert world.keys["valid"].split("-", 3)[3] not in text


async def test_health_is_public_and_admin_routes_need_an_admin(
    world: World, rs_auth: Authenticator, aiohttp_client
) -> None:
    client = await aiohttp_client(make_app(rs_auth))
    assert (await client.get("/health")).status == 200
    for path in ("/metrics", "/ready"):
        assert (await client.get(path)).status == 401
        denied = await client.get(path, headers=bearer(world.keys["valid"]))
        assert denied.status == 403
        assert (await denied.json())["error"]["code"] == "admin_required"
        assert (await client.get(path, headers=bearer(world.keys["admin"]))).status == 200


async def test_admin_routes_can_be_made_public(rs_auth: Authenticator, aiohttp_client) -> None:
    server = ServerConfig(public_metrics=True, public_ready=True)
    client = await aiohttp_client(make_app(rs_auth, server))
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/ready")).status == 200
    assert (await client.get("/v1/models")).status == 401


async def test_only_metrics_public_keeps_ready_protected(rs_auth, aiohttp_client) -> None:
    client = await aiohttp_client(make_app(rs_auth, ServerConfig(public_metrics=True)))
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/ready")).status == 401


async def test_disabled_auth_admits_everyone_everywhere(aiohttp_client) -> None:
    auth = Authenticator(AuthConfig(enabled=False), None)
    client = await aiohttp_client(make_app(auth))
    response = await client.get("/v1/models")
    assert (await response.json())["kind"] == "anonymous"
    assert (await client.get("/metrics")).status == 200


async def test_parser_error_log_is_redacted_when_the_filter_is_installed(
    world: World, rs_auth: Authenticator, aiohttp_client, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("aiohttp.server")
    redaction = RedactSecretsFilter()
    logger.addFilter(redaction)
    try:
        client = await aiohttp_client(make_app(rs_auth))
        padded = world.keys["valid"] + "A" * 100_000
        with caplog.at_level(logging.ERROR, logger="aiohttp.server"):
            response = await client.get("/v1/models", headers=bearer(padded))
    finally:
        logger.removeFilter(redaction)
    assert response.status == 400
    secret = world.keys["valid"].split("-", 3)[3]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "Got more than" in logged  # the parser error was logged ...
    assert secret not in logged  # ... without the key


def test_redact_keeps_key_ids_and_drops_secrets() -> None:
    text = "b'Bearer sk-llms-0123456789ab-Sec_ret-xyz AAA' and eyJhbGc.eyJzdWIi.c2ln"
    assert redact(text) == "b'Bearer sk-llms-0123456789ab-<redacted> AAA' and <jwt>"


@pytest.mark.parametrize("which", ["two Authorization", "two X-API-Key", "both, different"])
async def test_two_credentials_in_one_request_are_a_400(
    which: str, world: World, rs_auth: Authenticator, aiohttp_client
) -> None:
    from multidict import CIMultiDict

    valid, admin = world.keys["valid"], world.keys["admin"]
    headers = {
        "two Authorization": [("Authorization", f"Bearer {valid}"),
                              ("Authorization", f"Bearer {admin}")],
        "two X-API-Key": [("X-API-Key", valid), ("X-API-Key", admin)],
        "both, different": [("Authorization", f"Bearer {valid}"), ("X-API-Key", admin)],
    }[which]  # fmt: skip
    client = await aiohttp_client(make_app(rs_auth))
    response = await client.get("/v1/models", headers=CIMultiDict(headers))
    text = await response.text()
    assert response.status == 400, text
    assert json.loads(text)["error"]["code"] == "ambiguous_credentials"
    assert valid not in text and admin not in text


async def test_the_same_key_in_both_headers_is_one_credential(
    world: World, rs_auth: Authenticator, aiohttp_client
) -> None:
    valid = world.keys["valid"]
    client = await aiohttp_client(make_app(rs_auth))
    response = await client.get(
        "/v1/models", headers={"Authorization": f"Bearer {valid}", "X-API-Key": valid}
    )
    assert response.status == 200
