"""Our attention function, plugged into any transformers model through its attention interface.

The engine runs the model on the new tokens of all its sequences packed into one row
(`input_ids [1, T]`, explicit `position_ids`) and passes a `PagedBatch` as a keyword argument that
transformers forwards untouched to every attention call. Each call writes the layer's new keys and
values into their slots of the KV pool, then attends through the block tables.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from sharedecode.deferred_rotary import take_deferred
from sharedecode.kv_pool import KVPool

if TYPE_CHECKING:  # the kernels are imported when first used: tests set TRITON_INTERPRET before that
    from sharedecode.kernels.shared_prefix import PrefixGroups

ATTENTION_NAME = "sharedecode_paged"
BACKENDS = ("torch", "triton")
# True: a plain decode step's attention kernel takes the new K/V from its inputs and stores them
# itself (one launch instead of two). Its first version (the store ahead of the tile loop) took 3.48
# against 1.97 ms at batch 64 on the H100; this one stores after the loop and was 0-3% faster at
# batch 1, 8 and 64 in three runs (bench/NOTES.md, items 27 and 32; `bench_e2e.py --ablate-kv-write`).
WRITE_KV_IN_KERNEL = True


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
    prefix_groups: PrefixGroups | None = None  # shared-prefix groups of a decode step (triton)
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
    rope = take_deferred(query, key)  # (cos, sin) when the kernels must rotate query and key
    q = query[0].transpose(0, 1)
    k_cache, v_cache = batch.pool.layer(module.layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if batch.backend == "triton":
        # the cascade has no window or softcap: such layers take the plain kernel
        groups = None if sliding_window or softcap else batch.prefix_groups
        key, value = key[0].transpose(0, 1), value[0].transpose(0, 1)
        if torch.compiler.is_compiling():
            # Opaque to torch.compile: the fused model code around it is compiled, the kernels run as is.
            out = _compiled_step(q, key, value, batch, module.layer_idx, float(scale), sliding_window,
                                 softcap, groups, rope)
        else:
            out = _triton_step(q, key, value, k_cache, v_cache, batch, scale, sliding_window, softcap,
                               groups, rope)
    else:
        from sharedecode.kernels.paged_attention import paged_attention_torch

        key = key[0].transpose(0, 1)
        if rope is not None:
            from sharedecode.kernels.rotary import rotary_torch

            q, key = rotary_torch(q, *rope), rotary_torch(key, *rope)
        batch.pool.write(module.layer_idx, key, value[0].transpose(0, 1), batch.slot_mapping)
        out = paged_attention_torch(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                    batch.query_start_loc, scale=scale, sliding_window=sliding_window,
                                    softcap=softcap)
    return out.unsqueeze(0), None


def _compiled_step(q, key, value, batch: PagedBatch, layer_idx: int, scale: float, sliding_window, softcap,
                   groups: PrefixGroups | None, rope) -> torch.Tensor:
    """The step as one custom op per layer: the cascade when there are groups, else plain paged."""
    cos, sin = rope if rope is not None else (None, None)
    if groups is None:
        return torch.ops.sharedecode.paged_attention_step(
            q, key, value, batch.pool.tensor, layer_idx, batch.slot_mapping, batch.block_tables,
            batch.context_lens, batch.query_start_loc, scale, sliding_window, softcap,
            batch.max_context_len, batch.num_splits, cos, sin)
    return torch.ops.sharedecode.shared_prefix_step(
        q, key, value, batch.pool.tensor, layer_idx, batch.slot_mapping, batch.block_tables,
        batch.context_lens, groups.members, groups.chunk_start, groups.chunk_count,
        groups.chunk_prefix_len, groups.seq_prefix_len, scale, groups.max_chunk_members,
        batch.num_splits, cos, sin)


def _triton_step(q, key, value, k_cache, v_cache, batch: PagedBatch, scale, sliding_window, softcap,
                 prefix_groups: PrefixGroups | None, rope=None) -> torch.Tensor:
    """Write the new keys/values into their slots, then attend through the block tables (in one
    launch for a plain decode step: the attention kernel writes them itself). `rope` (cos, sin):
    the query and key still need their rotary embedding (deferred_rotary.py): the kernel that
    loads them applies it, the attention kernel itself or the KV write."""
    from sharedecode.kernels.kv_cache_ops import write_kv

    one_launch = prefix_groups is None and q.shape[0] == batch.block_tables.shape[0] and WRITE_KV_IN_KERNEL
    if not one_launch and rope is not None:
        from sharedecode.kernels.rotary import rope_write_kv

        q = rope_write_kv(q, key, value, *rope, k_cache, v_cache, batch.slot_mapping)
        rope = None
    elif not one_launch:
        write_kv(key, value, k_cache, v_cache, batch.slot_mapping)
    if prefix_groups is not None:
        from sharedecode.kernels.shared_prefix import shared_prefix_decode

        return shared_prefix_decode(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                    scale=scale, groups=prefix_groups, suffix_splits=batch.num_splits)
    from sharedecode.kernels.paged_attention import paged_attention

    return paged_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                           batch.query_start_loc, scale=scale, sliding_window=sliding_window,
                           softcap=softcap, max_context_len=batch.max_context_len,
                           num_splits=batch.num_splits,
                           new_kv=(key, value, batch.slot_mapping) if one_launch else None, rope=rope)


# Declared without mutated arguments on purpose: the op writes the new tokens' K/V into the pool and
# only this op reads the pool, so to the compiled graph it is a pure function of its inputs. Declaring
# the write would make torch.compile functionalize it, at the risk of copying the whole pool.
@torch.library.custom_op("sharedecode::paged_attention_step", mutates_args=())
def _paged_attention_step(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_pool: torch.Tensor, layer_idx: int,
    slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
    query_start_loc: torch.Tensor, scale: float, sliding_window: Optional[int], softcap: Optional[float],
    max_context_len: Optional[int], num_splits: Optional[int], cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    batch = PagedBatch(pool=None, backend="triton", slot_mapping=slot_mapping, block_tables=block_tables,
                       context_lens=context_lens, query_start_loc=query_start_loc,
                       max_context_len=max_context_len, is_decode=True, num_splits=num_splits)
    return _triton_step(query, key, value, kv_pool[layer_idx, 0], kv_pool[layer_idx, 1], batch, scale,
                        sliding_window, softcap, None, _rope(cos, sin))


@_paged_attention_step.register_fake
def _(query, key, value, kv_pool, layer_idx, slot_mapping, block_tables, context_lens, query_start_loc,
      scale, sliding_window, softcap, max_context_len, num_splits, cos=None, sin=None):
    return query.new_empty(query.shape)


# Like paged_attention_step (no declared mutation, same reason). The group tensors are a
# capacity-padded layout (see PrefixGroups): the launch config follows from their shapes and
# max_chunk_members only, so the compiled step, and a CUDA graph of it, is valid for any groups that
# fit the capacity.
@torch.library.custom_op("sharedecode::shared_prefix_step", mutates_args=())
def _shared_prefix_step(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_pool: torch.Tensor, layer_idx: int,
    slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
    members: torch.Tensor, chunk_start: torch.Tensor, chunk_count: torch.Tensor,
    chunk_prefix_len: torch.Tensor, seq_prefix_len: torch.Tensor, scale: float, max_chunk_members: int,
    num_splits: Optional[int], cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from sharedecode.kernels.shared_prefix import PrefixGroups

    groups = PrefixGroups(members=members, chunk_start=chunk_start, chunk_count=chunk_count,
                          chunk_prefix_len=chunk_prefix_len, seq_prefix_len=seq_prefix_len, groups=None,
                          members_per_chunk=max_chunk_members, max_chunk_members=max_chunk_members,
                          max_prefix_len=None, max_suffix_len=None)
    batch = PagedBatch(pool=None, backend="triton", slot_mapping=slot_mapping, block_tables=block_tables,
                       context_lens=context_lens, query_start_loc=None, max_context_len=None,
                       is_decode=True, num_splits=num_splits)
    return _triton_step(query, key, value, kv_pool[layer_idx, 0], kv_pool[layer_idx, 1], batch, scale,
                        None, None, groups, _rope(cos, sin))


@_shared_prefix_step.register_fake
def _(query, key, value, kv_pool, layer_idx, slot_mapping, block_tables, context_lens, members, chunk_start,
      chunk_count, chunk_prefix_len, seq_prefix_len, scale, max_chunk_members, num_splits, cos=None, sin=None):
    return query.new_empty(query.shape)


def _rope(cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]):
    return None if cos is None else (cos, sin)


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
