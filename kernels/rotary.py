"""Rotary position embedding applied by the kernels that load the queries and keys anyway.

    rotary_torch(x, cos, sin) -> x rotated                          plain-torch reference
    rope_write_kv(query, key, value, cos, sin, k_cache, v_cache, slot_mapping) -> query rotated
    rope_write_kv_torch(...)                                        the same in plain torch

The rotate-half form that Llama-family models in transformers apply before attention:
`x * cos + rotate_half(x) * sin`, with cos/sin [T, D] (the halves of D repeat the same angles) and
rotate_half(x) = [-x[D/2:], x[:D/2]]. Computed in fp32 and rounded once to x's dtype, as
torch.compile's fused kernel does. In the captured decode step the model's own rotary is deferred
(sharedecode/deferred_rotary.py) and done here: `rope_write_kv` rotates the queries and keys and
writes the keys and values into their slots in one launch, where the compiled model took three (q
rotary, k rotary, KV write); the plain decode kernel (paged_attention.py) rotates as it loads.
"""
from __future__ import annotations

import torch

from . import pdl

# (paged_attention.py imports this module's jit helpers: nothing from it is imported here at load)
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - the torch reference is the CPU backend
    HAS_TRITON = False

__all__ = ["rotary_torch", "rope_write_kv", "rope_write_kv_torch", "check_rope"]


def check_rope(rope, tokens: int, head_dim: int, device: torch.device) -> None:
    """`rope` must be (cos, sin), each [tokens, head_dim] floating point on `device`, D even."""
    if not isinstance(rope, tuple) or len(rope) != 2:
        raise TypeError("rope must be a tuple (cos, sin)")
    for name, t in zip(("cos", "sin"), rope):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rope's {name} must be a tensor, got {type(t).__name__}")
        if t.shape != (tokens, head_dim):
            raise ValueError(f"rope's {name} must be [T={tokens}, D={head_dim}], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"rope's {name} must be floating point, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"rope's {name} is on {t.device}, the queries on {device}")
        if t.stride(-1) != 1:
            raise ValueError(f"rope's {name} must be contiguous in its last dimension")
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")


def rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, D] (rotate-half form), in fp32, rounded to x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None].float() + rotated * sin[:, None].float()).to(x.dtype)


def rope_write_kv_torch(query, key, value, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """Reference of rope_write_kv: the rotated key and the value into their slots (negative:
    skipped), the rotated query returned."""
    from .kv_cache_ops import _check_write, write_kv_torch

    _check_write(key, value, k_cache, v_cache, slot_mapping)
    check_rope((cos, sin), query.shape[0], query.shape[-1], query.device)
    write_kv_torch(rotary_torch(key, cos, sin), value, k_cache, v_cache, slot_mapping)
    return rotary_torch(query, cos, sin)


if HAS_TRITON:

    @triton.jit
    def rotate_half(x, x_partner, cos, sin, first_half):
        """x * cos + rotate_half(x) * sin in fp32, from x and its partner elements (d + D/2 mod D)
        loaded alongside; `first_half` marks d < D/2, whose partner enters negated."""
        partner = x_partner.to(tl.float32)
        return x.to(tl.float32) * cos.to(tl.float32) + tl.where(first_half, -partner, partner) * sin.to(tl.float32)

    @triton.jit
    def _load_rotated(X, rows, offs_d, mask, COS, SIN, D: tl.constexpr):
        """Rows `rows` (element offsets of their first element) of X, each rotated by cos/sin rows
        already offset to its token; fp32."""
        partner = (offs_d + D // 2) % D
        x = tl.load(X + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
        x_partner = tl.load(X + rows[:, None] + partner[None, :], mask=mask, other=0.0)
        d_mask = offs_d < D
        cos = tl.load(COS + offs_d, mask=d_mask, other=0.0)
        sin = tl.load(SIN + offs_d, mask=d_mask, other=0.0)
        return rotate_half(x, x_partner, cos[None, :], sin[None, :], (offs_d < D // 2)[None, :])

    @triton.jit
    def _rope_write_kv_kernel(Q, K, V, COS, SIN, QOUT, KC, VC, SLOTS,
                              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_cos, stride_sin, stride_ot, stride_oh,
                              stride_cb, stride_ct, stride_ch, stride_vcb, stride_vct, stride_vch,
                              HQ: tl.constexpr, HQ_PAD: tl.constexpr, H: tl.constexpr,
                              H_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                              BS: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # (see pdl.py) the queries, keys and values are the previous kernel's output
            tl.extra.cuda.gdc_wait()
        t = tl.program_id(0).to(tl.int64)
        od = tl.arange(0, D_PAD)
        cos = COS + t * stride_cos
        sin = SIN + t * stride_sin
        oq = tl.arange(0, HQ_PAD)
        mq = (oq[:, None] < HQ) & (od[None, :] < D)
        q = _load_rotated(Q, t * stride_qt + oq * stride_qh, od, mq, cos, sin, D)
        tl.store(QOUT + t * stride_ot + oq[:, None] * stride_oh + od[None, :], q.to(QOUT.dtype.element_ty),
                 mask=mq)
        slot = tl.load(SLOTS + t).to(tl.int64)
        if slot >= 0:  # negative: a padding row, nothing stored
            blk = slot // BS
            off = slot % BS
            oh = tl.arange(0, H_PAD)
            m = (oh[:, None] < H) & (od[None, :] < D)
            k = _load_rotated(K, t * stride_kt + oh * stride_kh, od, m, cos, sin, D)
            v = tl.load(V + t * stride_vt + oh[:, None] * stride_vh + od[None, :], mask=m)
            tl.store(KC + blk * stride_cb + off * stride_ct + oh[:, None] * stride_ch + od[None, :],
                     k.to(KC.dtype.element_ty), mask=m)
            tl.store(VC + blk * stride_vcb + off * stride_vct + oh[:, None] * stride_vch + od[None, :],
                     v, mask=m)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output (tests patch this to poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def rope_write_kv(query, key, value, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """query [T, Hq, D], key/value [T, Hkv, D] (last dimension contiguous, any row strides), cos/sin
    [T, D]: rotate the queries and keys, store the rotated keys and the values at slot_mapping [T]
    (negative slots skipped) and return the rotated queries [T, Hq, D] (contiguous). One launch,
    one program per token, no host sync: capturable in a CUDA graph."""
    from .kv_cache_ops import _check_write

    _check_write(key, value, k_cache, v_cache, slot_mapping)
    if not isinstance(query, torch.Tensor) or query.dim() != 3 or query.shape[0] != key.shape[0] \
            or query.shape[2] != key.shape[2] or query.shape[1] % key.shape[1]:
        raise ValueError(f"query must be [T={key.shape[0]}, Hq (a multiple of {key.shape[1]}), "
                         f"D={key.shape[2]}], got {tuple(getattr(query, 'shape', ()))}")
    if query.dtype != key.dtype or query.device != key.device:
        raise TypeError(f"query ({query.dtype} on {query.device}) must match key ({key.dtype} on {key.device})")
    check_rope((cos, sin), query.shape[0], query.shape[-1], query.device)
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use rope_write_kv_torch")
    for name, x in (("query", query), ("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"the last dimension of {name} must be contiguous")
    t, hq, d = query.shape
    out = _alloc((t, hq, d), query.dtype, query.device)
    if t == 0:
        return out
    h = key.shape[1]
    use_pdl = pdl.applies(query.device)
    _rope_write_kv_kernel[(t,)](
        query, key, value, cos, sin, out, k_cache, v_cache, slot_mapping,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), HQ=hq, HQ_PAD=triton.next_power_of_2(hq), H=h, H_PAD=triton.next_power_of_2(h), D=d,
        D_PAD=triton.next_power_of_2(d), BS=k_cache.shape[1], PDL=use_pdl, num_warps=4 if hq * d <= 4096 else 8,
        **pdl.launch_options(use_pdl))
    return out
