"""benchmarks/gpu_check.sh cannot run without a GPU: here it is parsed by bash and, where it is
installed, checked by shellcheck; what it depends on in the repository is checked too."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_bash_parses_it() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_finds_nothing() -> None:
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_it_is_strict_executable_and_cleans_up() -> None:
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert "\ntrap cleanup EXIT\n" in text
    assert SCRIPT.stat().st_mode & 0o111


def test_what_it_uses_exists() -> None:
    text = SCRIPT.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "pip\" install -q -e '.[gpu]'" in text and extras["gpu"][0].startswith("vllm==")
    config = text.split('CONFIG="${GPU_CHECK_CONFIG:-', 1)[1].split("}", 1)[0]
    engine = yaml.safe_load((ROOT / config).read_text())["engine"]
    assert engine["model"].startswith("./models/")
    for series in ("llmserve_gpu_utilization_ratio", "llmserve_gpu_memory_used_bytes",
                   "llmserve_gpu_memory_total_bytes"):  # fmt: skip
        assert series in text
        assert series in (ROOT / "llmserve" / "metrics.py").read_text()
