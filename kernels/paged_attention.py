"""Paged attention over a block-table KV cache: a plain-torch reference and one Triton kernel.

One function covers prefill, chunked (suffix) prefill after a cached prefix, and decode:

    paged_attention(query, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                    *, scale, sliding_window=None, softcap=None, out=None) -> out

Shapes (S sequences, T new tokens packed over all sequences):
    query            [T, Hq, D]                       fp16 / bf16 / fp32
    k_cache, v_cache [num_blocks, block_size, Hkv, D] same dtype as query, Hq % Hkv == 0
    block_tables     [S, max_blocks] int32            unused entries may hold any value
    context_lens     [S] int32   tokens of each sequence INCLUDING its new ones (already in cache)
    query_start_loc  [S + 1] int32 cumulative query counts (query_start_loc[0] == 0)
Query j (0-based) of sequence s sits at position context_len - q_len + j and attends causally to
keys 0..that position (and, with a sliding window w, only to keys at positions > position - w).
Scores are ``scale * q.k``, then ``softcap * tanh(score / softcap)``, then masked with -inf.

The Triton kernel packs the GQA heads of one KV head into the rows of one ``tl.dot``: a program
owns (a block of BLOCK_Q query tokens x the G query heads of one KV head) and streams that KV
head's keys tile by tile through the block table, so each KV tile is loaded once per KV head and
query block. Decode batches with few sequences use split-KV (flash-decoding): the key range of each
query is cut into NUM_SPLITS pieces whose partial results are merged by log-sum-exp: by the last
of a query's split programs to finish (a per-(token, KV head) arrival counter that the merging
program resets), so a decode step is one launch instead of a kernel and a merge kernel. Nothing
in the launch path reads device memory on the host, so the decode path can be captured in a CUDA
graph (grid size comes from tensor shapes and the optional python-int hint ``max_context_len``).
"""
from __future__ import annotations

import os

import torch

from . import pdl

try:  # Triton is optional: the torch reference is the CPU backend.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["paged_attention", "paged_attention_torch", "HAS_TRITON"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# validation shared by the torch and Triton versions (and by shared_prefix.py)
# ----------------------------------------------------------------------------------------------
def _check_common(query, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                  softcap, dtypes):
    if not all(isinstance(t, torch.Tensor) for t in (query, k_cache, v_cache, block_tables,
                                                     context_lens)):
        raise TypeError("query, k_cache, v_cache, block_tables and context_lens must be tensors")
    if query.dim() != 3:
        raise ValueError(f"query must be [T, Hq, D], got shape {tuple(query.shape)}")
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("k_cache and v_cache must be [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                         "must have the same shape")
    if query.dtype not in dtypes:
        raise TypeError(f"query dtype {query.dtype} not supported (expected one of {dtypes})")
    if k_cache.dtype != query.dtype or v_cache.dtype != query.dtype:
        raise TypeError(f"k_cache/v_cache dtype ({k_cache.dtype}, {v_cache.dtype}) must match "
                        f"query dtype {query.dtype}")
    _, hq, d = query.shape
    _, bs, hkv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"head_dim of query ({d}) and cache ({dk}) differ")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if bs <= 0 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two, got {bs}")
    if block_tables.dim() != 2 or block_tables.dtype not in _INDEX_DTYPES:
        raise ValueError("block_tables must be a 2-D int32 (or int64) tensor [S, max_blocks], got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    s = block_tables.shape[0]
    if context_lens.dim() != 1 or context_lens.shape[0] != s or context_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(f"context_lens must be an int32 tensor [S={s}], got "
                         f"{tuple(context_lens.shape)} {context_lens.dtype}")
    dev = query.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("context_lens", context_lens)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, query on {dev}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a python float, got {type(scale).__name__}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or softcap <= 0):
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")


def _check_qsl(query_start_loc, s, device):
    if not isinstance(query_start_loc, torch.Tensor):
        raise TypeError("query_start_loc must be a tensor")
    if (query_start_loc.dim() != 1 or query_start_loc.shape[0] != s + 1
            or query_start_loc.dtype not in _INDEX_DTYPES):
        raise ValueError(f"query_start_loc must be an int32 tensor [S+1={s + 1}], got "
                         f"{tuple(query_start_loc.shape)} {query_start_loc.dtype}")
    if query_start_loc.device != device:
        raise ValueError(f"query_start_loc is on {query_start_loc.device}, query on {device}")


def _check_out(out, query):
    if out is None:
        return torch.empty_like(query)
    if not isinstance(out, torch.Tensor):
        raise TypeError("out must be a tensor or None")
    if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        raise ValueError(f"out must match query ({tuple(query.shape)}, {query.dtype}, "
                         f"{query.device}), got ({tuple(out.shape)}, {out.dtype}, {out.device})")
    return out


# ----------------------------------------------------------------------------------------------
# plain torch: the reference and the CPU backend
# ----------------------------------------------------------------------------------------------
def _compute_dtype(dtype):
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _scores_to_probs(scores, qpos, kpos, kvalid, scale, sliding_window, softcap):
    """scores [..., Q, K] (already q.k); qpos [..., Q, 1]-broadcastable; kpos/kvalid [..., 1, K]."""
    scores = scores * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = (kpos <= qpos) & kvalid
    if sliding_window is not None:
        mask = mask & (kpos > qpos - sliding_window)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def paged_attention_torch(query, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                          *, scale, sliding_window=None, softcap=None, out=None,
                          max_context_len=None):
    """Paged attention in plain torch (reference and CPU backend).

    query [T, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables
    [S, max_blocks] int32; context_lens [S] int32 (tokens incl. the new ones, whose K/V are
    already in the cache); query_start_loc [S+1] int32. Returns out [T, Hq, D] in query dtype.

    Computes in the input dtype for fp32/fp64 and in fp32 for fp16/bf16. Reads context_lens and
    query_start_loc on the host (one sync). Decode batches (one query per sequence) are done in
    one batched matmul over the padded contexts, everything else one sequence at a time.
    ``max_context_len`` is accepted for signature parity with the Triton version and ignored.
    """
    _check_common(query, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                  softcap, _KERNEL_DTYPES + (torch.float64,))
    s = block_tables.shape[0]
    _check_qsl(query_start_loc, s, query.device)
    out = _check_out(out, query)
    t, hq, d = query.shape
    _, bs, hkv, _ = k_cache.shape
    g = hq // hkv
    cdt = _compute_dtype(query.dtype)
    qsl = query_start_loc.tolist()
    ctx = context_lens.tolist()
    if qsl[0] != 0 or qsl[-1] != t:
        raise ValueError(f"query_start_loc must start at 0 and end at T={t}, got {qsl[0]}..{qsl[-1]}")
    qlens = [qsl[i + 1] - qsl[i] for i in range(s)]
    for i in range(s):
        if qlens[i] < 0 or ctx[i] < qlens[i]:
            raise ValueError(f"sequence {i}: q_len {qlens[i]} must be >= 0 and <= context_len {ctx[i]}")
        if -(-ctx[i] // bs) > block_tables.shape[1]:
            raise ValueError(f"sequence {i}: context_len {ctx[i]} needs more than "
                             f"{block_tables.shape[1]} blocks")
    if t == 0:
        return out
    dev = query.device

    if s > 0 and all(n == 1 for n in qlens):  # decode: one batched matmul over padded contexts
        max_ctx = max(ctx)
        nb = -(-max_ctx // bs)
        bt = block_tables[:, :nb].long().clamp(0, k_cache.shape[0] - 1)
        k = k_cache[bt].reshape(s, nb * bs, hkv, d).to(cdt)            # [S, K, Hkv, D]
        v = v_cache[bt].reshape(s, nb * bs, hkv, d).to(cdt)
        q = query.to(cdt).view(s, hkv, g, d)
        scores = torch.einsum("shgd,skhd->shgk", q, k)                 # [S, Hkv, G, K]
        kpos = torch.arange(nb * bs, device=dev).view(1, 1, 1, -1)
        cl = context_lens.to(dev).long().view(s, 1, 1, 1)
        probs = _scores_to_probs(scores, cl - 1, kpos, kpos < cl, scale, sliding_window, softcap)
        # slots past a sequence's end hold anything (even NaN): 0 * NaN must not reach the output
        v = v.masked_fill((kpos.view(1, -1) >= cl.view(s, 1)).view(s, -1, 1, 1), 0.0)
        o = torch.einsum("shgk,skhd->shgd", probs, v)
        out.copy_(o.reshape(s, hq, d))
        return out

    for i in range(s):
        q0, ql, c = qsl[i], qlens[i], ctx[i]
        if ql == 0:
            continue
        nb = -(-c // bs)
        blocks = block_tables[i, :nb].long()
        k = k_cache[blocks].reshape(nb * bs, hkv, d)[:c].to(cdt)        # [C, Hkv, D]
        v = v_cache[blocks].reshape(nb * bs, hkv, d)[:c].to(cdt)
        q = query[q0:q0 + ql].to(cdt).view(ql, hkv, g, d)
        scores = torch.einsum("qhgd,khd->hgqk", q, k)                  # [Hkv, G, Q, C]
        qpos = torch.arange(c - ql, c, device=dev).view(ql, 1)
        kpos = torch.arange(c, device=dev).view(1, c)
        probs = _scores_to_probs(scores, qpos, kpos, torch.ones((), dtype=torch.bool, device=dev),
                                 scale, sliding_window, softcap)
        o = torch.einsum("hgqk,khd->qhgd", probs, v)
        out[q0:q0 + ql] = o.reshape(ql, hq, d)
    return out


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _find_seq(qsl_ptr, target, num_seqs, BLOCK_Q: tl.constexpr):
        """Largest s with start(s) <= target, start(s) = qsl[s] // BLOCK_Q + s (or qsl[s] if BLOCK_Q == 1)."""
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            v = tl.load(qsl_ptr + mid)
            if BLOCK_Q > 1:
                v = v // BLOCK_Q + mid
            if v <= target:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _scaled_scores(s, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr):
        """Raw q.k scores [M, N] -> scaled (and soft-capped) scores in the log2 domain."""
        if HAS_SOFTCAP:
            x = s * (qk_scale / softcap)
            # tanh(x) = 1 - 2 / (exp(2x) + 1), in log2 form; saturates cleanly at +-1
            return softcap * (1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)) * 1.4426950408889634
        return s * (qk_scale * 1.4426950408889634)

    @triton.jit
    def _online_softmax_step(acc, m_i, l_i, s, v, PREC: tl.constexpr):
        """Fold one tile of masked log2 scores s [M, N] and values v [N, D] into the running
        max m_i, denominator l_i and output acc (flash attention's online softmax)."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return acc, m_new, l_i

    @triton.jit
    def _attend_tiles(acc, m_i, l_i, q, k_base, v_base, bt_row, tile_lo, tile_hi, kv_lo, kv_hi,
                      qpos, row_valid, offs_d, d_mask, stride_kb, stride_kt, stride_vb, stride_vt,
                      qk_scale, softcap, window,
                      BS: tl.constexpr, TILE_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                      DOT_F32: tl.constexpr, K_ROWS: tl.constexpr):
        """Online softmax over key tiles [tile_lo, tile_hi) of one sequence (log2 domain).
        K_ROWS loads K as [N, D] rows (like V) and transposes it in the dot, else as [D, N]."""
        offs_n = tl.arange(0, TILE_N)
        for t in range(tile_lo, tile_hi):
            kpos = t * TILE_N + offs_n
            kmask = (kpos >= kv_lo) & (kpos < kv_hi)
            blk = tl.load(bt_row + kpos // BS, mask=kmask, other=0).to(tl.int64)
            off = (kpos % BS).to(tl.int64)
            k_off = blk * stride_kb + off * stride_kt
            v_off = blk * stride_vb + off * stride_vt
            if K_ROWS:
                kt = tl.trans(tl.load(k_base + k_off[:, None] + offs_d[None, :],
                                      mask=kmask[:, None] & d_mask[None, :], other=0.0))  # [N, D]^T
            else:
                kt = tl.load(k_base + k_off[None, :] + offs_d[:, None],
                             mask=kmask[None, :] & d_mask[:, None], other=0.0)      # [D, N]
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :],
                        mask=kmask[:, None] & d_mask[None, :], other=0.0)      # [N, D]
            if DOT_F32:  # the Triton interpreter's bf16 dot is broken: upcast there only
                kt = kt.to(tl.float32)
                v = v.to(tl.float32)
            s = _scaled_scores(tl.dot(q, kt, input_precision=PREC), qk_scale, softcap, HAS_SOFTCAP)
            mask = row_valid[:, None] & kmask[None, :]
            if CAUSAL:
                mask = mask & (kpos[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                mask = mask & (kpos[None, :] > qpos[:, None] - window)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, tl.where(mask, s, float("-inf")), v, PREC)
        return acc, m_i, l_i

    @triton.jit
    def _paged_attn_kernel(
        Q, K, V, BT, CTX, QSL, KV_START, OUT, PACC, PLSE, ARRIVALS, KNEW, VNEW, SLOTS, COS, SIN,
        num_seqs, num_kv_heads, qk_scale, softcap, window,
        stride_nkt, stride_nkh, stride_nvt, stride_nvh, stride_cos, stride_sin,
        stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_bt, stride_ot, stride_oh,
        stride_pt, stride_ph, stride_ps, split_offset,
        G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, TILE_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
        K_ROWS: tl.constexpr, MERGE_HERE: tl.constexpr, NS_PAD: tl.constexpr,
        WRITE_KV: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:  # (see pdl.py) everything here may be the previous kernel's output
            tl.extra.cuda.gdc_wait()
        pid_q = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq = _find_seq(QSL, pid_q, num_seqs, BLOCK_Q)
        q_start = tl.load(QSL + seq)
        q_len = tl.load(QSL + seq + 1) - q_start
        if BLOCK_Q > 1:
            qb = pid_q - (q_start // BLOCK_Q + seq)
        else:
            qb = pid_q - q_start
        if qb * BLOCK_Q >= q_len:
            return
        ctx = tl.load(CTX + seq)

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < D
        q_in = offs_m // G_PAD
        h = offs_m % G_PAD
        qi = qb * BLOCK_Q + q_in
        row_valid = (offs_m < BLOCK_Q * G_PAD) & (h < G) & (qi < q_len)
        tok = (q_start + qi).to(tl.int64)
        head = kvh * G + h
        qpos = ctx - q_len + qi

        if ROPE:  # (decode, one token per program) the query rotated as it is loaded
            dec_tok = (q_start + qb).to(tl.int64)
            q = _load_rotated(Q, tok * stride_qt + head * stride_qh, offs_d, row_valid[:, None] & d_mask[None, :],
                              COS + dec_tok * stride_cos, SIN + dec_tok * stride_sin, D)
            q = q.to(Q.dtype.element_ty)
        else:
            q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                        mask=row_valid[:, None] & d_mask[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        first_pos = ctx - q_len + qb * BLOCK_Q
        kv_hi = ctx - q_len + tl.minimum(qb * BLOCK_Q + BLOCK_Q, q_len)   # last position + 1
        kv_lo = 0
        if HAS_KV_START:
            kv_lo = tl.load(KV_START + seq)
        if HAS_WINDOW:
            kv_lo = tl.maximum(kv_lo, first_pos - window + 1)
        tile_lo = kv_lo // TILE_N
        tile_hi = (kv_hi + TILE_N - 1) // TILE_N
        if NUM_SPLITS > 1:
            per = (tile_hi - tile_lo + NUM_SPLITS - 1) // NUM_SPLITS
            t0 = tile_lo + split * per
            tile_hi = tl.minimum(t0 + per, tile_hi)
            tile_lo = t0

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        bt_row = BT + seq.to(tl.int64) * stride_bt
        kv_read_hi = kv_hi
        if WRITE_KV:  # (decode) the new token's K/V are not in the cache yet: read the keys before it
            kv_read_hi = kv_hi - 1
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, K + kvh * stride_kh, V + kvh * stride_vh, bt_row, tile_lo, tile_hi,
            kv_lo, kv_read_hi, qpos, row_valid, offs_d, d_mask, stride_kb, stride_kt, stride_vb,
            stride_vt, qk_scale, softcap, window, BS, TILE_N, HAS_SOFTCAP, HAS_WINDOW, True, PREC,
            DOT_F32, K_ROWS)
        if WRITE_KV:
            # The program whose tiles end at the new token attends to it from registers (as a tile
            # whose one key is the new one) and then stores it into its slot. Nothing in this launch
            # reads that slot, so no barrier and no store ahead of the tile loop's pipelined loads.
            new_tok = (q_start + qb).to(tl.int64)
            last_tile = (kv_hi - 1) // TILE_N
            if (tile_lo <= last_tile) & (last_tile < tile_hi):
                if ROPE:
                    one_row = tl.zeros([1], dtype=tl.int64) + new_tok * stride_nkt + kvh * stride_nkh
                    new_k = _load_rotated(KNEW, one_row,
                                          offs_d, d_mask[None, :], COS + new_tok * stride_cos,
                                          SIN + new_tok * stride_sin, D)
                    new_k = tl.reshape(new_k, (D_PAD,)).to(KNEW.dtype.element_ty)
                else:
                    new_k = tl.load(KNEW + new_tok * stride_nkt + kvh * stride_nkh + offs_d, mask=d_mask,
                                    other=0.0)
                new_v = tl.load(VNEW + new_tok * stride_nvt + kvh * stride_nvh + offs_d, mask=d_mask,
                                other=0.0)
                first = tl.arange(0, TILE_N) == 0
                kt = tl.where(first[None, :], new_k[:, None], 0.0).to(new_k.dtype)  # [D, N]: key 0
                vt = tl.where(first[:, None], new_v[None, :], 0.0).to(new_v.dtype)  # [N, D]
                if DOT_F32:
                    kt = kt.to(tl.float32)
                    vt = vt.to(tl.float32)
                s_new = _scaled_scores(tl.dot(q, kt, input_precision=PREC), qk_scale, softcap, HAS_SOFTCAP)
                s_new = tl.where(row_valid[:, None] & first[None, :], s_new, float("-inf"))
                acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s_new, vt, PREC)
                new_slot = tl.load(SLOTS + new_tok).to(tl.int64)  # negative: padding, not stored
                if new_slot >= 0:
                    new_at = (new_slot // BS) * stride_kb + (new_slot % BS) * stride_kt + kvh * stride_kh
                    tl.store(K + new_at + offs_d, new_k, mask=d_mask)
                    new_at = (new_slot // BS) * stride_vb + (new_slot % BS) * stride_vt + kvh * stride_vh
                    tl.store(V + new_at + offs_d, new_v, mask=d_mask)

        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        o = acc / l_safe[:, None]
        if NUM_SPLITS == 1 and not HAS_KV_START:
            tl.store(OUT + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                     o.to(OUT.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])
        else:
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
            pbase = tok * stride_pt + head * stride_ph + (split_offset + split) * stride_ps
            tl.store(PACC + pbase[:, None] + offs_d[None, :], o,
                     mask=row_valid[:, None] & d_mask[None, :])
            tl.store(PLSE + pbase // D_PAD, lse, mask=row_valid)
            if MERGE_HERE:  # decode (one query token): the last split program to arrive merges
                tok0 = (q_start + qb).to(tl.int64)
                counter = ARRIVALS + tok0 * num_kv_heads + kvh
                # acq_rel: this program's partials are visible before its arrival is counted, and
                # the last arrival sees every other program's partials
                arrived = tl.atomic_add(counter, 1, sem="acq_rel")
                if arrived == NUM_SPLITS - 1:
                    tl.atomic_xchg(counter, 0, sem="relaxed")  # ready for the next launch
                    slot = tl.arange(0, NS_PAD) < NUM_SPLITS
                    for g in tl.static_range(G):  # (names of their own: a runtime `if` block)
                        o_g = _merge_partials(PACC, PLSE, tok0 * stride_pt + (kvh * G + g) * stride_ph,
                                              slot, D, D_PAD, NS_PAD)
                        tl.store(OUT + tok0 * stride_ot + (kvh * G + g) * stride_oh + offs_d,
                                 o_g.to(OUT.dtype.element_ty), mask=d_mask)

    @triton.jit
    def _merge_kernel(PACC, PLSE, OUT, stride_pt, stride_ph, stride_ot, stride_oh,
                      NS: tl.constexpr, NS_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        offs_s = tl.arange(0, NS_PAD)
        offs_d = tl.arange(0, D_PAD)
        o = _merge_partials(PACC, PLSE, tok * stride_pt + head * stride_ph, offs_s < NS, D, D_PAD, NS_PAD)
        tl.store(OUT + tok * stride_ot + head * stride_oh + offs_d, o.to(OUT.dtype.element_ty),
                 mask=offs_d < D)

    @triton.jit
    def _merge_partials(PACC, PLSE, base, slot, D: tl.constexpr, D_PAD: tl.constexpr,
                        NS_PAD: tl.constexpr):
        """The log-sum-exp-weighted mean [D_PAD] of one row's split partials (acc at PACC + base,
        base-2 lse at PLSE + base // D_PAD) over the splits where `slot` holds. Splits with
        lse = -inf (empty, or never written: the prefix slots of sequences in no shared-prefix
        group) are not read, so garbage there cannot turn 0 * NaN into NaN."""
        offs_s = tl.arange(0, NS_PAD)
        offs_d = tl.arange(0, D_PAD)
        lse = tl.load(PLSE + base // D_PAD + offs_s, mask=slot, other=float("-inf"))
        mx = tl.max(lse, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp2(lse - mx)
        live = slot & (lse > float("-inf"))
        acc = tl.load(PACC + base + offs_s[:, None] * D_PAD + offs_d[None, :],
                      mask=live[:, None] & (offs_d[None, :] < D), other=0.0)
        den = tl.sum(w, 0)
        den = tl.where(den == 0.0, 1.0, den)
        return tl.sum(acc * w[:, None], 0) / den


def _next_pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _tile_n(d_pad, block_m):
    if d_pad >= 256:
        return 32
    return 64 if block_m <= 64 else 32


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_f32(dtype):
    """Upcast dot operands to fp32: only for bf16 under the Triton interpreter, whose bf16 dot
    returns garbage (triton 3.9). On a GPU bf16 operands go to the tensor cores as they are."""
    return dtype == torch.bfloat16 and _interpreting()


def _check_triton(query):
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use paged_attention_torch")
    if query.stride(-1) != 1:
        raise ValueError("query's last dimension must be contiguous")


def _check_cache_strides(k_cache, v_cache):
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous")


def _alloc_partials(t, hq, num_splits, d_pad, device):
    """fp32 scratch for split-KV: acc [T, Hq, NS, D_PAD] and lse [T, Hq, NS] (base-2)."""
    pacc = torch.empty((t, hq, num_splits, d_pad), dtype=torch.float32, device=device)
    plse = torch.empty((t, hq, num_splits), dtype=torch.float32, device=device)
    return pacc, plse


MERGE_SPLITS_IN_KERNEL = True  # False: the separate merge kernel (a benchmark's ablation)
_ARRIVALS_MIN = 1 << 16
_arrivals: dict[tuple[torch.device, int], torch.Tensor] = {}


def arrival_counters(count: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters for a last-arrival step (the folded split merge here, the folded
    split-K sum of skinny_matmul.py): `count` of them, one per group of programs of a launch.
    Every launch leaves them zero again (the program that arrives last resets its counter), so one buffer
    per device and stream serves every call on that stream; per stream, because launches on two
    streams may run at once. A graph capture stream gets its buffer inside its first capture (from
    the graph's pool, zeroed by a node of that graph); it is large from the start so that no later
    launch replaces an address a graph holds."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _arrivals.get(key)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(_ARRIVALS_MIN, _next_pow2(count)), dtype=torch.int32, device=device)
        _arrivals[key] = counters
    return counters


def _launch_merge(pacc, plse, out, num_splits, d, d_pad):
    t, hq = out.shape[0], out.shape[1]
    if t == 0:
        return
    _merge_kernel[(t, hq)](
        pacc, plse, out, pacc.stride(0), pacc.stride(1), out.stride(0), out.stride(1),
        NS=num_splits, NS_PAD=max(2, _next_pow2(num_splits)), D=d, D_PAD=d_pad, num_warps=4)


def _launch_paged(query, k_cache, v_cache, block_tables, context_lens, query_start_loc, out,
                  scale, sliding_window, softcap, num_splits, *, kv_start=None, pacc=None,
                  plse=None, split_offset=0, block_q=None, tile_n=None, num_warps=None,
                  num_stages=None, k_rows=None, merge_here=False, new_kv=None, rope=None):
    """Launch the unified kernel. With num_splits > 1 or kv_start it writes partials (pacc/plse);
    `merge_here` (decode splits without kv_start) also merges them into `out` in the same launch.
    `new_kv` (decode): (key, value, slot_mapping) written into the caches by the kernel itself;
    `rope` (with new_kv): (cos, sin) that rotate the query and the new key as they are loaded."""
    t, hq, d = query.shape
    _, bs, hkv, _ = k_cache.shape
    s = block_tables.shape[0]
    g = hq // hkv
    g_pad = _next_pow2(g)
    d_pad = max(16, _next_pow2(d))
    decode = t == s
    if block_q is None:
        block_q = 1 if decode else max(1, 64 // g_pad)
    block_m = max(16, block_q * g_pad)
    if tile_n is None:
        tile_n = _tile_n(d_pad, block_m)
    if k_rows is None:
        # K as [N, D] rows: faster at head_dim 64 on the H100 (up to 14%, never slower), mixed at
        # 128 (faster for a shared prefix, 16% slower at batch 32 x 4k): NOTES-kernels.md
        k_rows = d_pad <= 64
    tile_n = max(16, tile_n)
    n_qblocks = t if block_q == 1 else t // block_q + s
    prec = "ieee" if query.dtype == torch.float32 else None
    if num_warps is None:
        num_warps = 4 if block_m <= 64 else 8
    extra = {}
    if num_stages is not None:
        extra["num_stages"] = num_stages
    partial = num_splits > 1 or kv_start is not None
    if not partial:
        pacc = plse = out  # unused placeholders
    if merge_here and (not decode or num_splits == 1 or kv_start is not None):
        raise ValueError("merge_here needs a decode batch (T == S) with num_splits > 1 and no kv_start")
    arrivals = arrival_counters(t * hkv, query.device) if merge_here else context_lens
    if new_kv is not None and (not decode or kv_start is not None):
        raise ValueError("new_kv needs a decode batch (T == S) without kv_start")
    new_k, new_v, slots = new_kv if new_kv is not None else (query, query, context_lens)
    if rope is not None and (new_kv is None or block_q != 1):
        raise ValueError("rope needs new_kv (a decode batch) and one query per program")
    cos, sin = rope if rope is not None else (query, query)
    grid = (n_qblocks, hkv, num_splits)
    use_pdl = pdl.applies(query.device)
    _paged_attn_kernel[grid](
        query, k_cache, v_cache, block_tables, context_lens, query_start_loc,
        kv_start if kv_start is not None else context_lens, out, pacc, plse, arrivals,
        new_k, new_v, slots, cos, sin,
        s, hkv, float(scale), float(softcap or 1.0), int(sliding_window or 0),
        new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1), cos.stride(0), sin.stride(0),
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        pacc.stride(0) if partial else 0, pacc.stride(1) if partial else 0,
        pacc.stride(2) if partial else 0, split_offset,
        G=g, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_M=block_m, D=d, D_PAD=d_pad, BS=bs,
        TILE_N=tile_n, NUM_SPLITS=num_splits, HAS_KV_START=kv_start is not None,
        HAS_SOFTCAP=softcap is not None, HAS_WINDOW=sliding_window is not None, PREC=prec,
        DOT_F32=_dot_f32(query.dtype), K_ROWS=k_rows, MERGE_HERE=merge_here,
        NS_PAD=max(2, _next_pow2(num_splits)), WRITE_KV=new_kv is not None, ROPE=rope is not None, PDL=use_pdl,
        num_warps=num_warps, **extra, **pdl.launch_options(use_pdl))


def choose_num_splits(num_seqs, num_kv_heads, device, max_context_len=None, *,
                      min_tokens_per_split=64, max_splits=32):
    """Split-KV factor for a decode batch: enough programs to fill the GPU twice, capped so each
    split keeps at least ``min_tokens_per_split`` keys when ``max_context_len`` is known (64:
    measured best on the H100 for batch 1-8 at 512 keys, where 256 left the GPU idle)."""
    programs = max(1, num_seqs * num_kv_heads)
    target = 2 * _num_sms(device)
    n = min(max_splits, max(1, -(-target // programs)))
    if max_context_len is not None:
        n = min(n, max(1, -(-int(max_context_len) // min_tokens_per_split)))
    return n


def paged_attention(query, k_cache, v_cache, block_tables, context_lens, query_start_loc, *,
                    scale, sliding_window=None, softcap=None, out=None, max_context_len=None,
                    num_splits=None, new_kv=None, rope=None, _config=None):
    """Paged attention through the Triton kernel (GPU, or the Triton interpreter).

    query [T, Hq, D] fp16/bf16/fp32; k_cache, v_cache [num_blocks, block_size, Hkv, D] (same
    dtype); block_tables [S, max_blocks] int32; context_lens [S] int32 (tokens incl. the new ones,
    already written to the cache); query_start_loc [S+1] int32. Returns out [T, Hq, D].

    Handles prefill, suffix prefill after cached blocks and decode in one kernel. When every
    sequence has exactly one query (T == S) and the batch is too small to fill the GPU, keys are
    split over ``num_splits`` programs (chosen from S, Hkv and the optional python-int hint
    ``max_context_len``, or given) and merged by log-sum-exp. No host sync: safe to capture in a
    CUDA graph as long as shapes and python arguments stay the same. ``new_kv`` (decode batches
    only): (key [T, Hkv, D], value, slot_mapping [T]) of the new tokens, which the kernel attends
    to from these inputs and stores into their slots (one launch instead of `write_kv` and this);
    context_lens count them though they are not in the cache yet. A negative slot is a padding
    row: nothing is stored and its output is unspecified. ``rope`` (with ``new_kv`` only): (cos,
    sin) [T, D] that rotate the query and the new key (rotate-half form, see rotary.py) as the
    kernel loads them, so the cache gets the rotated key.
    ``_config`` (dict of
    block_q, tile_n, num_warps, num_stages, k_rows, merge_here: False merges the splits in a
    separate kernel as before) is for benchmarks.
    """
    _check_common(query, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                  softcap, _KERNEL_DTYPES)
    s = block_tables.shape[0]
    _check_qsl(query_start_loc, s, query.device)
    _check_triton(query)
    _check_cache_strides(k_cache, v_cache)
    out = _check_out(out, query)
    if max_context_len is not None and (not isinstance(max_context_len, int) or max_context_len < 0):
        raise ValueError(f"max_context_len must be a non-negative python int, got {max_context_len!r}")
    t, hq, d = query.shape
    if new_kv is not None:
        from .kv_cache_ops import _check_write

        if not isinstance(new_kv, tuple) or len(new_kv) != 3:
            raise TypeError("new_kv must be a tuple (key, value, slot_mapping)")
        _check_write(new_kv[0], new_kv[1], k_cache, v_cache, new_kv[2])
        if t != s or new_kv[0].shape[0] != t:
            raise ValueError(f"new_kv is for decode batches (one query per sequence, T == S) with T "
                             f"keys; got T={t}, S={s} and {new_kv[0].shape[0]} keys (write them "
                             "with write_kv first)")
        if new_kv[0].stride(-1) != 1 or new_kv[1].stride(-1) != 1:
            raise ValueError("new_kv's key and value must be contiguous in their last dimension")
    if rope is not None:
        if new_kv is None:
            raise ValueError("rope is applied to the query and the new key: it needs new_kv")
        from .rotary import check_rope

        check_rope(rope, t, d, query.device)
        if query.stride(-1) != 1:
            raise ValueError("with rope, the query must be contiguous in its last dimension")
    if t == 0 or s == 0:
        return out
    decode = t == s
    if num_splits is None:
        num_splits = choose_num_splits(s, k_cache.shape[2], query.device, max_context_len) if decode else 1
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if num_splits > 1 and not decode:
        raise ValueError("num_splits > 1 is only supported for decode batches (T == S)")
    cfg = dict(_config or {})
    if num_splits == 1:
        _launch_paged(query, k_cache, v_cache, block_tables, context_lens, query_start_loc, out,
                      scale, sliding_window, softcap, 1, new_kv=new_kv, rope=rope, **cfg)
        return out
    d_pad = max(16, _next_pow2(d))
    pacc, plse = _alloc_partials(t, hq, num_splits, d_pad, query.device)
    merge_here = cfg.pop("merge_here", MERGE_SPLITS_IN_KERNEL)
    _launch_paged(query, k_cache, v_cache, block_tables, context_lens, query_start_loc, out,
                  scale, sliding_window, softcap, num_splits, pacc=pacc, plse=plse,
                  merge_here=merge_here, new_kv=new_kv, rope=rope, **cfg)
    if not merge_here:
        _launch_merge(pacc, plse, out, num_splits, d, d_pad)
    return out


if HAS_TRITON:  # (imported last: rotary.py imports this module's helpers)
    from .rotary import _load_rotated  # noqa: E402
