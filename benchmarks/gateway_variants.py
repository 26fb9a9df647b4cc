"""Server CPU per request of llmserve with parts of the gateway switched off, and of a bare
aiohttp server on the same fake engine (full speed, 8 tokens, closed loop of 32 for 5 s).

    .venv/bin/python benchmarks/gateway_variants.py
"""

import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gateway import closed_loop, create_key, measured, server
from tests.support.process import free_port

BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def cfg(tmp, port, auth=True, limits=True, ledger=True, queue=True):
    c = {
        "server": {"host": "127.0.0.1", "port": port},
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 100000},
        "auth": {"enabled": auth, "keys": str(tmp / "keys")},
        "limits": {
            "state_dir": str(tmp / f"l{port}"),
            "default_tier": "b",
            "tiers": {
                "b": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12} if limits else {}
            },
        },
        "queue": {"max_depth": 10000, "max_concurrency": 10000},
        "usage": {"ledger": str(tmp / "u.jsonl") if ledger else None},
        "logging": {"level": "warning", "access_log": False},
    }
    p = tmp / f"c{port}.yaml"
    p.write_text(json.dumps(c))
    return p


async def main():
    tmp = Path(tempfile.mkdtemp())
    variants = {
        "all": {},
        "no auth": {"auth": False},
        "no limits": {"limits": False},
        "no ledger": {"ledger": False},
        "none": {"auth": False, "limits": False, "ledger": False},
    }
    for name, kw in variants.items():
        port = free_port()
        c = cfg(tmp, port, **kw)
        key = create_key(c, "b") if kw.get("auth", True) else "x"
        with server([sys.executable, "-m", "llmserve", "up", "-c", str(c)], port) as (url, pid):
            h = {"Authorization": f"Bearer {key}"}
            await closed_loop(url + "/v1/chat/completions", h, 32, 1, BODY)
            (n, st), cpu = await measured(
                pid, closed_loop(url + "/v1/chat/completions", h, 32, 5, BODY)
            )
            print(f"{name:<10} {n / 5:8.0f} req/s  {cpu / n * 1e6:6.0f} us CPU/req  {st}")


async def bare():
    from benchmarks.gateway import BARE_SERVER

    port = free_port()
    with server([sys.executable, "-c", BARE_SERVER, str(port), "0"], port) as (url, pid):
        await closed_loop(url + "/v1/chat/completions", {}, 32, 1, BODY)
        (n, st), cpu = await measured(
            pid, closed_loop(url + "/v1/chat/completions", {}, 32, 5, BODY)
        )
        print(f"{'bare':<10} {n / 5:8.0f} req/s  {cpu / n * 1e6:6.0f} us CPU/req  {st}")


if __name__ == "__main__":
    asyncio.run(bare())
    asyncio.run(main())
