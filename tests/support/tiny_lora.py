"""Build LoRA adapters for the tiny test model (tests/support/tiny_model.py) by hand, in PEFT's
format, without `peft`: `adapter_config.json` and `adapter_model.safetensors` with random
`lora_A`/`lora_B` weights for every layer's `q_proj` and `v_proj`.

The weights are large next to the tiny model's own (initializer range 0.02), so an adapter
changes the model's greedy output; two adapters with different seeds change it differently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RANK = 8
ALPHA = 16
TARGETS = ("q_proj", "v_proj")
_DONE_MARKER = ".complete"


def build_tiny_lora(out_dir: Path, model_dir: Path, seed: int, rank: int = RANK) -> Path:
    """Write an adapter of `rank` for the model in `model_dir` to `out_dir` (reused when a
    previous build completed) and return it."""
    if (out_dir / _DONE_MARKER).exists():
        return out_dir
    import torch
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // config["num_attention_heads"])
    out_features = {
        "q_proj": config["num_attention_heads"] * head_dim,
        "v_proj": config["num_key_value_heads"] * head_dim,
    }
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for module in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = torch.randn(rank, hidden, generator=generator) * 0.1
            b = torch.randn(out_features[module], rank, generator=generator) * 0.1
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    (out_dir / _DONE_MARKER).write_text("ok\n")
    return out_dir


if __name__ == "__main__":
    print(build_tiny_lora(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])))
