"""The small default model shipped inside the package.

``sharedecode/models/tiny-shakespeare`` holds a ~2.4M-parameter Llama (4 layers, hidden 192,
6 query heads sharing 2 key/value heads, tied embeddings, fp32 weights) and its byte-level BPE
tokenizer (4096 tokens), trained on the complete works of Shakespeare by
``recipes/train_tiny_model.py`` (details and validation loss in ``training.json`` there).
It loads offline, in well under a second, and is meant for tests, examples and demos.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["EMBEDDED_MODEL_DIR", "load_embedded_model"]

#: Folder of the embedded model, in Hugging Face ``save_pretrained`` layout.
EMBEDDED_MODEL_DIR: Path = Path(__file__).resolve().parent / "models" / "tiny-shakespeare"


def load_embedded_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the embedded model and tokenizer from :data:`EMBEDDED_MODEL_DIR` (never online).

    Returns ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode with the requested
    ``dtype`` on ``device``, and a fast tokenizer (bos = eos = ``<|endoftext|>``,
    pad = ``<|pad|>``; no special tokens are added when encoding).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (EMBEDDED_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"embedded model missing at {EMBEDDED_MODEL_DIR}; rebuild it with recipes/train_tiny_model.py"
        )
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=dtype, local_files_only=True)
    model.to(device)
    model.eval()
    return model, tokenizer
