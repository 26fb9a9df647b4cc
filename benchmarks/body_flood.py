"""/health latency while clients flood the server with the largest invalid bodies it accepts.

Starts llmserve on the fake engine (auth off, so no limit refuses the bodies before they are
read), then measures GET /health latency twice, one request at a time on one keep-alive
connection: alone, and while `--attackers` clients (in another process) post, back to back,
chat request bodies that fail validation (tests/support/flood.py says what each kind holds; the
largest are just under `server.max_body_bytes`, 4 MiB).

    .venv/bin/python benchmarks/body_flood.py [--seconds 10] [--attackers 8]
        [--kinds ints,roles,stop,lists,deep,messages,nested,budget] [--json-thread-bytes N]

Prints /health p50/p99/max alone and under attack, and what the attackers got back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.flood import (  # noqa: E402
    KINDS,
    poll_health,
    start_attackers,
    summary,
    write_bodies,
)
from tests.support.process import free_port, kill_group, wait_http  # noqa: E402


def start_server(tmp: Path, port: int, server: dict[str, object]) -> subprocess.Popen[bytes]:
    config = {
        "server": {"port": port, **server},
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 4096},
        "auth": {"enabled": False},
        "limits": {"state_dir": str(tmp / "limits")},
        "usage": {"ledger": str(tmp / "usage.jsonl")},
        "logging": {"level": "warning"},
    }
    path = tmp / "llmserve.yaml"
    path.write_text(yaml.safe_dump(config))
    with open(tmp / "server.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "llmserve", "up", "-c", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=tmp)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--attackers", type=int, default=8)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument(
        "--json-thread-bytes", type=int, default=None, help="server.json_thread_bytes"
    )
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    server: dict[str, object] = {}
    if args.json_thread_bytes is not None:
        server["json_thread_bytes"] = args.json_thread_bytes
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = write_bodies(tmp, kinds)
        port = free_port()
        proc = start_server(tmp, port, server)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(base + "/health", 30, proc)
            alone = asyncio.run(poll_health(base + "/health", args.seconds))
            url = base + "/v1/chat/completions"
            attackers = start_attackers(url, args.seconds, args.attackers, paths)
            try:
                time.sleep(0.5)  # let the flood start
                flooded = asyncio.run(poll_health(base + "/health", args.seconds - 0.5))
                out, _ = attackers.communicate(timeout=args.seconds + 120)
            finally:
                kill_group(attackers)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            finally:
                kill_group(proc)
    result = json.loads(out)
    answers: Counter[str] = Counter()
    for key, count in result["seen"].items():
        kind, status, code, named = json.loads(key)
        answers[f"{kind}: {status} {code}{'' if named else ' (limit not named!)'}"] += count
    total = sum(answers.values())
    print(f"bodies: {', '.join(kinds)} ({args.attackers} attackers, {args.seconds:g} s)")
    print(f"/health alone:        {summary(alone)}")
    print(f"/health under attack: {summary(flooded)}")
    print(f"attackers: {total} requests ({total / args.seconds:.1f}/s), "
          f"slowest answer {result['slowest'] * 1000:.0f} ms")  # fmt: skip
    for answer, count in sorted(answers.items()):
        print(f"  {count:6d} x {answer}")


if __name__ == "__main__":
    main()
