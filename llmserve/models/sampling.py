"""Sampling defaults that come with a model (its `generation_config.json`), read without vLLM.

vLLM (`--generation-config auto`, its default) applies these to every request that leaves the
field unset; llmserve does the same on both of its paths. `llmserve check` shows them, and
`llmserve models prepare` writes the model card's recommendation for the default model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The fields vLLM takes from a generation config as request defaults.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# SmolLM2-135M-Instruct's model card: temperature 0.2, top_p 0.9. (Sampled at temperature 1,
# "What is the capital of France?" gets a made-up city most of the time.)
SMOLLM2_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


def model_sampling_defaults(model_dir: Path) -> dict[str, Any]:
    """The request defaults a local model directory carries ({} when it carries none)."""
    try:
        config = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return (
        {k: config[k] for k in SAMPLING_FIELDS if k in config} if isinstance(config, dict) else {}
    )


def write_sampling_defaults(model_dir: Path, defaults: dict[str, Any]) -> bool:
    """Add `defaults` to the model's generation config where it sets none; True if it changed."""
    path = model_dir / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = {}
    missing = {k: v for k, v in defaults.items() if k not in config}
    if not missing:
        return False
    path.write_text(json.dumps({**config, **missing}, indent=2) + "\n")
    return True
