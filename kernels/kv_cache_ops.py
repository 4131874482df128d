"""KV cache writes and block copies, Triton kernels with plain-torch references.

    write_kv(key, value, k_cache, v_cache, slot_mapping)       new tokens' K/V into their slots
    copy_blocks(kv_pool, src, dst)                             copy-on-write: whole blocks, all layers

Layout: kv_pool [layers, 2, num_blocks, block_size, Hkv, D]; k_cache = kv_pool[l, 0], v_cache =
kv_pool[l, 1], each [num_blocks, block_size, Hkv, D]; slot = block_id * block_size + offset.
"""
from __future__ import annotations

import torch

from . import pdl
from .paged_attention import HAS_TRITON, _INDEX_DTYPES, _next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["write_kv", "write_kv_torch", "copy_blocks", "copy_blocks_torch"]


def _check_write(key, value, k_cache, v_cache, slot_mapping):
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("slot_mapping", slot_mapping)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor")
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must both be [T, Hkv, D], got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"key [T, Hkv, D] = {tuple(key.shape)} does not fit cache "
                         f"{tuple(k_cache.shape)}")
    if key.dtype != k_cache.dtype or value.dtype != v_cache.dtype or key.dtype != value.dtype:
        raise TypeError(f"dtypes differ: key {key.dtype}, value {value.dtype}, k_cache "
                        f"{k_cache.dtype}, v_cache {v_cache.dtype}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must be [T={key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in _INDEX_DTYPES:
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    for name, t in (("value", value), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("slot_mapping", slot_mapping)):
        if t.device != key.device:
            raise ValueError(f"{name} is on {t.device}, key on {key.device}")


def write_kv_torch(key, value, k_cache, v_cache, slot_mapping):
    """Write key/value [T, Hkv, D] into k_cache/v_cache [num_blocks, block_size, Hkv, D] at
    slot_mapping [T] (slot = block * block_size + offset; negative = padding, skipped). In place."""
    _check_write(key, value, k_cache, v_cache, slot_mapping)
    nb, bs = k_cache.shape[:2]
    slots = slot_mapping.long()
    keep = slots >= 0
    idx = slots[keep]
    k_cache.view(nb * bs, *k_cache.shape[2:]).index_copy_(0, idx, key[keep])
    v_cache.view(nb * bs, *v_cache.shape[2:]).index_copy_(0, idx, value[keep])


if HAS_TRITON:

    @triton.jit
    def _write_kv_kernel(K, V, KC, VC, SLOTS, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_cb, stride_ct, stride_ch, stride_vcb, stride_vct, stride_vch,
                         H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                         BS: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # (see pdl.py) the keys and values are the previous kernel's output
            tl.extra.cuda.gdc_wait()
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(SLOTS + t).to(tl.int64)
        if slot < 0:
            return
        blk = slot // BS
        off = slot % BS
        oh = tl.arange(0, H_PAD)
        od = tl.arange(0, D_PAD)
        m = (oh[:, None] < H) & (od[None, :] < D)
        k = tl.load(K + t * stride_kt + oh[:, None] * stride_kh + od[None, :], mask=m)
        v = tl.load(V + t * stride_vt + oh[:, None] * stride_vh + od[None, :], mask=m)
        tl.store(KC + blk * stride_cb + off * stride_ct + oh[:, None] * stride_ch + od[None, :], k,
                 mask=m)
        tl.store(VC + blk * stride_vcb + off * stride_vct + oh[:, None] * stride_vch + od[None, :],
                 v, mask=m)

    @triton.jit
    def _copy_blocks_kernel(POOL, SRC, DST, stride_l, stride_kv, stride_b,
                            NUMEL: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        lk = tl.program_id(1).to(tl.int64)          # layer * 2 + (0 for K, 1 for V)
        chunk = tl.program_id(2)
        src = tl.load(SRC + i).to(tl.int64)
        dst = tl.load(DST + i).to(tl.int64)
        if src < 0:  # padding (a captured step's copy list is padded to its bucket)
            return
        base = (lk // 2) * stride_l + (lk % 2) * stride_kv
        o = chunk * BLOCK + tl.arange(0, BLOCK)
        m = o < NUMEL
        x = tl.load(POOL + base + src * stride_b + o, mask=m)
        tl.store(POOL + base + dst * stride_b + o, x, mask=m)


def write_kv(key, value, k_cache, v_cache, slot_mapping):
    """Triton version of write_kv_torch: key/value [T, Hkv, D] into the caches at slot_mapping [T]
    (negative slots skipped). One launch, one program per token; no host sync."""
    _check_write(key, value, k_cache, v_cache, slot_mapping)
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use write_kv_torch")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the last dimension of key, value and the caches must be contiguous")
    t, h, d = key.shape
    if t == 0:
        return
    use_pdl = pdl.applies(key.device)
    _write_kv_kernel[(t,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), H=h, H_PAD=_next_pow2(h), D=d, D_PAD=_next_pow2(d),
        BS=k_cache.shape[1], PDL=use_pdl, num_warps=4, **pdl.launch_options(use_pdl))


def _check_copy(kv_pool, src, dst):
    if not all(isinstance(t, torch.Tensor) for t in (kv_pool, src, dst)):
        raise TypeError("kv_pool, src and dst must be tensors")
    if kv_pool.dim() != 6 or kv_pool.shape[1] != 2:
        raise ValueError("kv_pool must be [layers, 2, num_blocks, block_size, Hkv, D], got "
                         f"{tuple(kv_pool.shape)}")
    if src.dim() != 1 or dst.shape != src.shape:
        raise ValueError(f"src and dst must both be [N], got {tuple(src.shape)} and {tuple(dst.shape)}")
    if src.dtype not in _INDEX_DTYPES or dst.dtype not in _INDEX_DTYPES:
        raise TypeError(f"src and dst must be int32 or int64, got {src.dtype} and {dst.dtype}")
    if src.device != kv_pool.device or dst.device != kv_pool.device:
        raise ValueError("src, dst and kv_pool must be on the same device")


def copy_blocks_torch(kv_pool, src, dst):
    """Copy blocks src[i] -> dst[i] [N] for every layer, K and V, of kv_pool
    [layers, 2, num_blocks, block_size, Hkv, D]. In place. dst ids must be distinct and not in src."""
    _check_copy(kv_pool, src, dst)
    if src.numel():
        kv_pool[:, :, dst.long()] = kv_pool[:, :, src.long()]


def copy_blocks(kv_pool, src, dst):
    """Triton version of copy_blocks_torch: one launch for all pairs, layers, K and V.
    dst ids must be distinct and not among src (fresh copy-on-write blocks); not checked (no sync).
    A pair with a negative src is padding and copies nothing (a captured step's fixed-size list)."""
    _check_copy(kv_pool, src, dst)
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use copy_blocks_torch")
    if not kv_pool[0, 0, 0].is_contiguous():
        raise ValueError("each block of kv_pool must be contiguous")
    n = src.shape[0]
    if n == 0:
        return
    layers = kv_pool.shape[0]
    numel = kv_pool[0, 0, 0].numel()
    block = min(4096, _next_pow2(numel))
    grid = (n, layers * 2, -(-numel // block))
    _copy_blocks_kernel[grid](kv_pool, src, dst, kv_pool.stride(0), kv_pool.stride(1),
                              kv_pool.stride(2), NUMEL=numel, BLOCK=block, num_warps=4)
