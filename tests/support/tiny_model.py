"""Build a tiny random Qwen2 chat model locally (no hub): the fixture of the engine tests.

Its weights are random, so its text is gibberish, but everything the engine does around a model
is real: a byte-level BPE tokenizer trained on local text, a ChatML chat template, `<|im_end|>`
as EOS, bf16 safetensors. About 5 MB, built in seconds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
VOCAB_SIZE = 4096
CORPUS_BYTES = 3 * 1024 * 1024
_DONE_MARKER = ".complete"


def build_tiny_model(out_dir: Path) -> Path:
    """Write the model to `out_dir` (reused when a previous build completed) and return it."""
    if (out_dir / _DONE_MARKER).exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    tokenizer.save_pretrained(out_dir)
    _save_random_model(out_dir, tokenizer)
    (out_dir / _DONE_MARKER).write_text("ok\n")
    return out_dir


def _corpus() -> Iterator[str]:
    """A few MB of the Python standard library's source: text that is on every machine."""
    stdlib = Path(sys.modules["os"].__file__ or "").parent
    budget = CORPUS_BYTES
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        yield text
        budget -= len(text)
        if budget <= 0:
            return


def _train_tokenizer():  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _save_random_model(out_dir: Path, tokenizer) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="bfloat16",
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(out_dir)


if __name__ == "__main__":
    print(build_tiny_model(Path(sys.argv[1])))
