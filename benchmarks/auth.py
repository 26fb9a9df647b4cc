"""Per-request cost of authentication (issue 4's target: < 50 us for a cached key and a JWT).

    .venv/bin/python benchmarks/auth.py [--calls 20000] [--repeat 7]

Each case runs `repeat` batches of `calls` authentications in one thread and prints the best
and the median batch as microseconds per call. "uncached" cases set auth.cache_seconds to 0,
so every call reads the key store (SQLite) or verifies the JWT signature.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

from llmserve.auth.authenticator import Authenticator
from llmserve.auth.jwt import mint_token
from llmserve.auth.keys import KeyStore
from llmserve.config import AuthConfig, JwtConfig, ServerConfig
from llmserve.errors import AuthenticationFailed
from llmserve.middleware.auth import auth_middleware


def per_call_us(fn: Callable[[], object], calls: int, repeat: int) -> tuple[float, float]:
    batches = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        batches.append((time.perf_counter() - start) / calls * 1e6)
    return min(batches), statistics.median(batches)


def refusing(auth: Authenticator, headers: dict[str, str]) -> Callable[[], object]:
    def call() -> None:
        try:
            auth.authenticate(headers)
        except AuthenticationFailed:
            return
        raise AssertionError("expected a refusal")

    return call


def write_keypair(directory: Path, name: str, private: object) -> JwtConfig:
    algorithm = "RS256" if name == "rs" else "ES256"
    private_file, public_file = directory / f"{name}.pem", directory / f"{name}.pub"
    private_file.write_bytes(
        private.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_file.write_bytes(
        private.public_key().public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return JwtConfig(
        algorithms=[algorithm], public_key_file=public_file, private_key_file=private_file
    )


def jwt_configs(directory: Path) -> dict[str, JwtConfig]:
    return {
        "HS256": JwtConfig(algorithms=["HS256"], secret=SecretStr("b" * 48)),
        "RS256": write_keypair(
            directory, "rs", rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ),
        "ES256": write_keypair(directory, "es", ec.generate_private_key(ec.SECP256R1())),
    }


def cases(directory: Path) -> dict[str, Callable[[], object]]:
    store = KeyStore(directory / "keys")
    _, key = store.create("bench")
    revoked_record, revoked = store.create("gone")
    store.revoke(revoked_record.id)
    unknown = "sk-llms-0123456789ab-" + "x" * 43
    cached = Authenticator(AuthConfig(keys=store.directory), store)
    uncached = Authenticator(AuthConfig(keys=store.directory, cache_seconds=0), store)
    bearer = {"Authorization": f"Bearer {key}"}
    out: dict[str, Callable[[], object]] = {
        "API key, cached": lambda: cached.authenticate(bearer),
        "API key, uncached (store read)": lambda: uncached.authenticate(bearer),
        "revoked key, uncached": refusing(uncached, {"Authorization": f"Bearer {revoked}"}),
        "unknown key, uncached": refusing(uncached, {"Authorization": f"Bearer {unknown}"}),
        "no credentials (401)": refusing(cached, {}),
    }
    for name, config in jwt_configs(directory).items():
        token = {"Authorization": f"Bearer {mint_token(config, 'user')}"}
        hot = Authenticator(AuthConfig(keys=store.directory, jwt=config), store)
        cold = Authenticator(AuthConfig(keys=store.directory, jwt=config, cache_seconds=0), store)
        out[f"JWT {name}, cached"] = lambda a=hot, h=token: a.authenticate(h)
        out[f"JWT {name}, uncached (signature)"] = lambda a=cold, h=token: a.authenticate(h)
    out["middleware + cached key"] = middleware_call(cached, bearer)
    return out


def middleware_call(auth: Authenticator, headers: dict[str, str]) -> Callable[[], object]:
    """The middleware around a no-op handler, driven without sockets (its own cost only)."""
    middleware = auth_middleware(auth, ServerConfig())
    app = web.Application()
    app.router.add_get("/v1/models", lambda r: web.Response())
    request = make_mocked_request("GET", "/v1/models", headers=headers, app=app)
    loop = asyncio.new_event_loop()
    request._match_info = loop.run_until_complete(app.router.resolve(request))

    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response()

    def call() -> None:
        coroutine = middleware(request, handler)
        try:
            coroutine.send(None)  # completes synchronously: nothing in it awaits I/O
        except StopIteration:
            return

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("| case | best us/call | median us/call |")
        print("|---|---:|---:|")
        for name, fn in cases(Path(tmp)).items():
            calls = args.calls if "uncached" not in name or "HS" in name else args.calls // 10
            best, median = per_call_us(fn, calls, args.repeat)
            print(f"| {name} | {best:.2f} | {median:.2f} |")


if __name__ == "__main__":
    main()
