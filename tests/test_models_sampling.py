"""Sampling defaults carried by a model directory: read, written once, shown by `check`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from llmserve.models.sampling import (
    SMOLLM2_SAMPLING,
    model_sampling_defaults,
    write_sampling_defaults,
)


def test_only_vllms_sampling_fields_are_read(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_k": 20, "max_new_tokens": 99, "eos_token_id": 2})
    )
    assert model_sampling_defaults(tmp_path) == {"temperature": 0.6, "top_k": 20}
    assert model_sampling_defaults(tmp_path / "missing") == {}


def test_writing_defaults_keeps_what_the_model_already_sets(tmp_path: Path) -> None:
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"eos_token_id": 2, "temperature": 0.7}))
    assert write_sampling_defaults(tmp_path, SMOLLM2_SAMPLING) is True
    assert json.loads(path.read_text()) == {"eos_token_id": 2, "temperature": 0.7, "top_p": 0.9}
    assert write_sampling_defaults(tmp_path, SMOLLM2_SAMPLING) is False  # idempotent


def test_check_shows_the_models_sampling_defaults(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    write_sampling_defaults(model, SMOLLM2_SAMPLING)
    config = tmp_path / "llmserve.yaml"
    config.write_text(f"engine: {{model: {model}}}\n")
    done = subprocess.run([sys.executable, "-m", "llmserve", "check", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "temperature=0.2 top_p=0.9" in done.stderr
    assert "# engine.dtype on CPU: " in done.stderr  # and why
