"""Convert a GGUF file (as llama.cpp and Ollama users have them) into a model directory.

transformers reads GGUF (architecture, weights, tokenizer and chat template); the weights are
dequantized and written as bf16 safetensors, which vLLM loads on CPU and GPU alike.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from llmserve.models.errors import ModelError

_MARKER = ".llmserve-import-complete"


def is_complete(model_dir: Path) -> bool:
    """True when `model_dir` holds a finished import (a crash mid-way leaves no marker)."""
    return (model_dir / _MARKER).exists() and (model_dir / "config.json").exists()


def import_gguf(gguf: Path, out_dir: Path) -> Path:
    """Write `gguf` as a Hugging Face directory at `out_dir` (replaced if it exists)."""
    if not gguf.is_file():
        raise ModelError(f"GGUF file not found: {gguf}")
    model, tokenizer = _load(gguf)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then swap in: an interrupted import never looks finished.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        _save(model, tokenizer, staging)
        (staging / _MARKER).write_text(f"{gguf.name}\n")
        staging.chmod(0o755)  # mkdtemp makes it private; a model directory is not secret
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _load(gguf: Path) -> tuple[Any, Any]:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise ModelError(
            f"converting GGUF needs transformers, gguf and accelerate: "
            f"pip install 'llmserve[models]' ({exc})"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.bfloat16,
        )
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"{gguf}: cannot read this GGUF file: {exc}") from None
    return _unquantized_copy(model), tokenizer


def _unquantized_copy(model: Any) -> Any:
    # A model loaded through a quantization config refuses save_pretrained: copy the (already
    # dequantized) weights into a plain model of the same class.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config).to(model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def _save(model: Any, tokenizer: Any, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
