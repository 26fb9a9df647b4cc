"""A local HTTPS identity provider for JWKS tests: an aiohttp server on 127.0.0.1 with a
certificate from a throwaway CA (tests/support/tls.py), serving a JWKS and an OIDC discovery
document, counting the requests it gets, and signing tokens with its keys.

    provider = IdentityProvider(ca)
    provider.add_key("k1", "rsa")
    await provider.start()
    token = provider.token("k1", sub="alice")
    provider.requests["/jwks.json"]      # fetches so far
    await provider.stop()                # unreachable from now on
"""

from __future__ import annotations

import collections
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.support.tls import TestCA

KeyKind = Literal["rsa", "ec", "ed25519"]
_DEFAULT_ALG = {"rsa": "RS256", "ec": "ES256", "ed25519": "EdDSA"}


@dataclass
class ProviderKey:
    private: Any
    alg: str  # what tokens are signed with
    jwk: dict[str, Any]  # as published (its `alg` may be absent)


def public_jwk(private: Any, kid: str, alg: str | None, **extra: Any) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    else:
        jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
    jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    return {**jwk, **extra}


def new_private_key(kind: KeyKind) -> Any:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


class IdentityProvider:
    __test__ = False

    def __init__(self, ca: TestCA, name: str = "idp") -> None:
        self.ca = ca
        self.keys: dict[str, ProviderKey] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        self.cache_control: str | None = "max-age=300"
        self.status = 200  # what the JWKS route answers
        self.discovery_issuer: str | None = None  # None: the real issuer
        cert, key = ca.issue(name, dns=["localhost"], ips=["127.0.0.1"])
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(cert, key)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- keys and tokens ------------------------------------------------------------------------

    def add_key(self, kid: str, kind: KeyKind = "rsa", *, publish_alg: bool = True,
                **jwk_extra: Any) -> ProviderKey:  # fmt: skip
        private = new_private_key(kind)
        alg = _DEFAULT_ALG[kind]
        key = ProviderKey(private, alg, public_jwk(private, kid, alg if publish_alg else None,
                                                   **jwk_extra))  # fmt: skip
        self.keys[kid] = key
        return key

    def token(self, kid: str, sub: str = "alice", *, header_kid: str | None = "", alg: str = "",
              **claims: Any) -> str:  # fmt: skip
        """A token signed with key `kid`; `header_kid` names another kid (None: no kid)."""
        key = self.keys[kid]
        now = int(time.time())
        body = {"sub": sub, "iss": self.issuer, "iat": now, "exp": now + 600, **claims}
        named = kid if header_kid == "" else header_kid
        headers = {"kid": named} if named is not None else {}
        return jwt.encode(body, key.private, algorithm=alg or key.alg, headers=headers)

    # -- the server -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return self.base_url

    @property
    def jwks_url(self) -> str:
        return self.base_url + "/jwks.json"

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk for k in self.keys.values()]}

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", self._jwks)
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._tls)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _jwks(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable")
        return web.json_response(self.jwks(), headers=headers)

    async def _discovery(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        return web.json_response({
            "issuer": self.discovery_issuer or self.issuer,
            "jwks_uri": self.jwks_url,
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        })  # fmt: skip
