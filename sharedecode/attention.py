"""Our attention function, plugged into any transformers model through its attention interface.

The engine runs the model on the new tokens of all its sequences packed into one row
(`input_ids [1, T]`, explicit `position_ids`) and passes a `PagedBatch` as a keyword argument that
transformers forwards untouched to every attention call. Each call writes the layer's new keys and
values into their slots of the KV pool, then attends through the block tables.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from sharedecode.kv_pool import KVPool

ATTENTION_NAME = "sharedecode_paged"
BACKENDS = ("torch", "triton")


@dataclass
class PagedBatch:
    """Paged metadata of one forward, built once and read by every layer."""

    pool: KVPool
    backend: str
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes
    block_tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: torch.Tensor  # [S] int32: tokens of each sequence including the new ones
    query_start_loc: torch.Tensor  # [S + 1] int32: cumulative new-token counts
    max_context_len: int
    is_decode: bool  # one new token per sequence
    prefix_groups: object | None = None  # shared-prefix groups of a decode step (triton backend)
    num_splits: int | None = None  # split-KV factor for decode; None: the kernel chooses


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sharedecode_batch: PagedBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    if sharedecode_batch is None:
        raise RuntimeError(
            f"the '{ATTENTION_NAME}' attention needs the engine's paged metadata; "
            "run the model through sharedecode.Engine"
        )
    batch = sharedecode_batch
    q = query[0].transpose(0, 1)
    k_cache, v_cache = batch.pool.layer(module.layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if batch.backend == "triton":
        from sharedecode.kernels.kv_cache_ops import write_kv

        write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, batch.slot_mapping)
        if batch.prefix_groups is not None and not sliding_window and not softcap:
            from sharedecode.kernels.shared_prefix import shared_prefix_decode

            out = shared_prefix_decode(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                       scale=scale, groups=batch.prefix_groups)
        else:
            from sharedecode.kernels.paged_attention import paged_attention

            out = paged_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                  batch.query_start_loc, scale=scale, sliding_window=sliding_window,
                                  softcap=softcap, max_context_len=batch.max_context_len,
                                  num_splits=batch.num_splits)
    else:
        from sharedecode.kernels.paged_attention import paged_attention_torch

        batch.pool.write(module.layer_idx, key[0].transpose(0, 1), value[0].transpose(0, 1),
                         batch.slot_mapping)
        out = paged_attention_torch(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                    batch.query_start_loc, scale=scale, sliding_window=sliding_window,
                                    softcap=softcap)
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs) -> None:
    """Causality and sequence boundaries come from the paged metadata, not from a mask tensor."""
    return None


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def check_supported(model: PreTrainedModel) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} ({model.config.model_type}) does not use transformers' attention "
            "interface, so its attention cannot run on the paged cache; supported are models such as "
            "Llama, Mistral, Qwen2/3, Phi-3, Gemma-2/3, GPT-2 and OLMo-2"
        )


@contextmanager
def paged_attention_enabled(model: PreTrainedModel) -> Iterator[None]:
    """Route the model's attention through the paged cache for the duration of the block.

    The model is switched back afterwards so that the user's own `model(...)` or `model.generate`
    keeps working on the same object.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
