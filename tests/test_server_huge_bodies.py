"""Huge invalid request bodies cost the event loop little: 8 clients posting, back to back, the
largest invalid bodies the server accepts (just under `server.max_body_bytes` of millions of
values, or two million levels deep) and the costliest ones within every count all get a 400
that names the limit, while /health keeps answering promptly."""

from __future__ import annotations

import asyncio
import json
import time

from tests.support.flood import EXPECTED, KINDS, poll_health, start_attackers, write_bodies
from tests.support.process import kill_group, llmserve_up

ATTACKERS = 8
SECONDS = 6.0
BOUND = 0.5  # seconds: the worst /health latency allowed under attack, above the one alone


def test_huge_invalid_bodies_are_refused_while_health_stays_prompt(tmp_path):
    config = {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 512},
        "auth": {"enabled": False},  # nothing refuses the bodies before they are read
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": str(tmp_path / "usage.jsonl")},
    }
    (tmp_path / "bodies").mkdir()
    paths = write_bodies(tmp_path / "bodies", KINDS)
    with llmserve_up(tmp_path, config) as server:
        health = server.base_url + "/health"
        alone = asyncio.run(poll_health(health, 2.0))
        url = server.base_url + "/v1/chat/completions"
        attackers = start_attackers(url, SECONDS, ATTACKERS, paths)
        try:
            time.sleep(0.5)  # the flood under way
            flooded = asyncio.run(poll_health(health, SECONDS - 1.0))
            out, _ = attackers.communicate(timeout=SECONDS + 120)
        finally:
            kill_group(attackers)
    seen = {tuple(json.loads(key)): count for key, count in json.loads(out)["seen"].items()}
    answers = {(kind, status, code) for kind, status, code, _ in seen}
    assert answers == {(kind, 400, code) for kind, (code, _) in EXPECTED.items()}
    assert all(named for _, _, _, named in seen)  # every message names the limit
    assert sum(seen.values()) >= 2 * len(KINDS) * ATTACKERS // 2  # the flood did flow
    assert len(flooded) >= 10
    assert max(flooded) < BOUND + max(alone), sorted(flooded)[-5:]
