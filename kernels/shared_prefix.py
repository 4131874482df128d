"""Shared-prefix decode: read a prefix shared by a group of sequences once for the whole group.

Beams and samples forked from one prompt hold the same leading block ids (copy-on-write). For a
decode step (one query per sequence) the attention of sequence s splits into its shared prefix
(the group's common full blocks) and its own remaining keys; the two parts are merged by
log-sum-exp, like FlashInfer's cascade / Hydragen:

    groups = find_prefix_groups(block_tables, context_lens, block_size)   # once per decode step
    out = shared_prefix_decode(query, k_cache, v_cache, block_tables, context_lens,
                               scale=scale, groups=groups)                 # every layer

The prefix kernel stacks the queries of (up to ``members_per_chunk``, default 32) group members times their
GQA heads into the rows of one ``tl.dot`` and streams the prefix blocks once per KV head and chunk,
so a prefix shared by 64 beams is read 64 / members_per_chunk times fewer than plain paged decode.
Each sequence's own keys go through the paged kernel (paged_attention.py) starting at its prefix
length, and a small kernel merges the partial results. Computes the same function as
``paged_attention`` on decode batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .paged_attention import (
    HAS_TRITON, _KERNEL_DTYPES, _alloc_partials, _check_cache_strides, _check_common, _check_out,
    _check_triton, _dot_f32, _launch_merge, _launch_paged, _next_pow2, _num_sms,
    choose_num_splits,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .paged_attention import _attend_tiles

__all__ = ["PrefixGroups", "find_prefix_groups", "shared_prefix_decode",
           "shared_prefix_decode_torch"]


@dataclass
class PrefixGroups:
    """Groups of decode sequences sharing leading blocks; compute once per step, reuse per layer.

    Device tensors (int32): ``members`` [M] sequence ids, grouped; ``chunk_start`` [C] offset into
    ``members`` of each chunk (a chunk = up to members_per_chunk members of one group, one program
    row-block); ``chunk_count`` [C]; ``chunk_prefix_len`` [C] shared tokens of the chunk's group;
    ``seq_prefix_len`` [S] shared tokens of each sequence (0 if in no group).
    Python: ``groups`` list of (member ids, shared blocks); ``members_per_chunk``;
    ``max_prefix_len`` and ``max_suffix_len`` (tokens) for choosing split counts.
    """

    members: torch.Tensor
    chunk_start: torch.Tensor
    chunk_count: torch.Tensor
    chunk_prefix_len: torch.Tensor
    seq_prefix_len: torch.Tensor
    groups: list
    members_per_chunk: int
    max_prefix_len: int
    max_suffix_len: int

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_start.shape[0])


def find_prefix_groups(block_tables, context_lens, block_size, min_group=2, members_per_chunk=32):
    """Group sequences whose leading block ids are identical (host-side, one sync).

    block_tables [S, max_blocks] int32; context_lens [S] int32 (tokens incl. the current one).
    Sequences are bucketed by their first block id; a bucket of >= ``min_group`` sequences shares
    the longest common run of leading block ids, counted in whole blocks and capped at the
    smallest member's number of full blocks (so every shared key is valid for every member).
    Returns a PrefixGroups whose tensors live on block_tables' device.
    """
    if not isinstance(block_tables, torch.Tensor) or not isinstance(context_lens, torch.Tensor):
        raise TypeError("block_tables and context_lens must be tensors")
    if block_tables.dim() != 2 or context_lens.dim() != 1 or context_lens.shape[0] != block_tables.shape[0]:
        raise ValueError(f"block_tables must be [S, max_blocks] and context_lens [S], got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(min_group, int) or min_group < 2:
        raise ValueError(f"min_group must be an int >= 2, got {min_group!r}")
    if not isinstance(members_per_chunk, int) or members_per_chunk < 1:
        raise ValueError(f"members_per_chunk must be a positive int, got {members_per_chunk!r}")
    s = block_tables.shape[0]
    bt = block_tables.tolist()
    ctx = context_lens.tolist()
    full = [min(c // block_size, len(bt[0]) if s else 0) for c in ctx]
    buckets: dict[int, list[int]] = {}
    for i in range(s):
        if full[i] >= 1:
            buckets.setdefault(bt[i][0], []).append(i)
    groups = []
    for mem in buckets.values():
        if len(mem) < min_group:
            continue
        n = min(full[i] for i in mem)
        lead = bt[mem[0]]
        k = 1
        while k < n and all(bt[i][k] == lead[k] for i in mem):
            k += 1
        groups.append((tuple(mem), k))
    members, cstart, ccount, cplen = [], [], [], []
    seq_plen = [0] * s
    for mem, nblk in groups:
        base = len(members)
        members.extend(mem)
        for j in range(0, len(mem), members_per_chunk):
            cstart.append(base + j)
            ccount.append(min(members_per_chunk, len(mem) - j))
            cplen.append(nblk * block_size)
        for i in mem:
            seq_plen[i] = nblk * block_size
    dev = block_tables.device

    def t(x):
        return torch.tensor(x, dtype=torch.int32).to(dev)

    return PrefixGroups(
        members=t(members), chunk_start=t(cstart), chunk_count=t(ccount),
        chunk_prefix_len=t(cplen), seq_prefix_len=t(seq_plen), groups=groups,
        members_per_chunk=members_per_chunk, max_prefix_len=max([0] + cplen),
        max_suffix_len=max([0] + [ctx[i] - seq_plen[i] for i in range(s)]))


if HAS_TRITON:

    @triton.jit
    def _prefix_kernel(
        Q, K, V, BT, CTX, MEMBERS, CSTART, CCOUNT, CPLEN, PACC, PLSE,
        qk_scale, softcap, window,
        stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_bt, stride_pt, stride_ph, stride_ps,
        G: tl.constexpr, G_PAD: tl.constexpr, MPC: tl.constexpr, BLOCK_M: tl.constexpr,
        D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, TILE_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        PREC: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        c = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        cstart = tl.load(CSTART + c)
        count = tl.load(CCOUNT + c)
        plen = tl.load(CPLEN + c)

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < D
        i = offs_m // G_PAD
        h = offs_m % G_PAD
        row_valid = (offs_m < MPC * G_PAD) & (h < G) & (i < count)
        seq = tl.load(MEMBERS + cstart + i, mask=row_valid, other=0).to(tl.int64)
        head = kvh * G + h
        ctx = tl.load(CTX + seq, mask=row_valid, other=1)
        qpos = ctx - 1
        q = tl.load(Q + seq[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_valid[:, None] & d_mask[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        kv_lo = 0
        if HAS_WINDOW:
            kv_lo = tl.maximum(0, tl.min(tl.where(row_valid, qpos, 2147483647), 0) - window + 1)
        tile_lo = kv_lo // TILE_N
        tile_hi = (plen + TILE_N - 1) // TILE_N
        per = (tile_hi - tile_lo + NUM_SPLITS - 1) // NUM_SPLITS
        t0 = tile_lo + split * per
        tile_hi = tl.minimum(t0 + per, tile_hi)
        tile_lo = t0

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        leader = tl.load(MEMBERS + cstart).to(tl.int64)
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, K + kvh * stride_kh, V + kvh * stride_vh, BT + leader * stride_bt,
            tile_lo, tile_hi, kv_lo, plen, qpos, row_valid, offs_d, d_mask, stride_kb, stride_kt,
            stride_vb, stride_vt, qk_scale, softcap, window, BS, TILE_N, HAS_SOFTCAP, HAS_WINDOW,
            False, PREC, DOT_F32)

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
        pbase = seq * stride_pt + head * stride_ph + split * stride_ps
        tl.store(PACC + pbase[:, None] + offs_d[None, :], acc / l_safe[:, None],
                 mask=row_valid[:, None] & d_mask[None, :])
        tl.store(PLSE + pbase // D_PAD, lse, mask=row_valid)


def _check_groups(groups, s, device):
    if not isinstance(groups, PrefixGroups):
        raise TypeError(f"groups must be a PrefixGroups (from find_prefix_groups), got "
                        f"{type(groups).__name__}")
    if groups.seq_prefix_len.shape[0] != s:
        raise ValueError(f"groups were computed for {groups.seq_prefix_len.shape[0]} sequences, "
                         f"batch has {s}")
    if groups.members.device != device:
        raise ValueError(f"groups live on {groups.members.device}, query on {device}")


def _check_decode(query, block_tables):
    if query.dim() == 3 and query.shape[0] != block_tables.shape[0]:
        raise ValueError(f"shared_prefix_decode is for decode: query must be [S, Hq, D] with "
                         f"S = {block_tables.shape[0]}, got {tuple(query.shape)}")


def shared_prefix_decode(query, k_cache, v_cache, block_tables, context_lens, *, scale,
                         groups=None, sliding_window=None, softcap=None, out=None,
                         prefix_splits=None, suffix_splits=None, max_context_len=None):
    """Decode attention (one query per sequence) reading each group's shared prefix once.

    query [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables
    [S, max_blocks] int32; context_lens [S] int32 (incl. the current token, already in the
    cache); groups from find_prefix_groups (computed here, with a host sync, if None).
    Returns out [S, Hq, D], the same as paged_attention on a decode batch.
    """
    _check_common(query, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                  softcap, _KERNEL_DTYPES)
    _check_decode(query, block_tables)
    _check_triton(query)
    _check_cache_strides(k_cache, v_cache)
    out = _check_out(out, query)
    s, hq, d = query.shape
    _, bs, hkv, _ = k_cache.shape
    if s == 0:
        return out
    if groups is None:
        groups = find_prefix_groups(block_tables, context_lens, bs)
    _check_groups(groups, s, query.device)
    qsl = torch.arange(s + 1, dtype=torch.int32, device=query.device)
    if suffix_splits is None:
        suffix_splits = choose_num_splits(s, hkv, query.device,
                                          groups.max_suffix_len if groups.num_chunks else max_context_len)
    if groups.num_chunks == 0:
        from .paged_attention import paged_attention
        return paged_attention(query, k_cache, v_cache, block_tables, context_lens, qsl,
                               scale=scale, sliding_window=sliding_window, softcap=softcap,
                               out=out, num_splits=suffix_splits)
    g = hq // hkv
    g_pad = _next_pow2(g)
    d_pad = max(16, _next_pow2(d))
    mpc = groups.members_per_chunk
    block_m = max(16, _next_pow2(mpc * g_pad))
    if prefix_splits is None:
        programs = groups.num_chunks * hkv
        prefix_splits = max(1, min(-(-2 * _num_sms(query.device) // programs),
                                   -(-groups.max_prefix_len // 256), 64))
    ns = prefix_splits + suffix_splits
    pacc, plse = _alloc_partials(s, hq, ns, d_pad, query.device)
    plse[:, :, :prefix_splits].fill_(float("-inf"))   # sequences in no group have no prefix part
    tile_n = 32 if d_pad >= 256 or block_m >= 128 else 64
    _prefix_kernel[(groups.num_chunks, hkv, prefix_splits)](
        query, k_cache, v_cache, block_tables, context_lens, groups.members, groups.chunk_start,
        groups.chunk_count, groups.chunk_prefix_len, pacc, plse,
        float(scale), float(softcap or 1.0), int(sliding_window or 0),
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        pacc.stride(0), pacc.stride(1), pacc.stride(2),
        G=g, G_PAD=g_pad, MPC=mpc, BLOCK_M=block_m, D=d, D_PAD=d_pad, BS=bs, TILE_N=tile_n,
        NUM_SPLITS=prefix_splits, HAS_SOFTCAP=softcap is not None,
        HAS_WINDOW=sliding_window is not None,
        PREC="ieee" if query.dtype == torch.float32 else None, DOT_F32=_dot_f32(query.dtype),
        num_warps=4 if block_m <= 64 else 8)
    _launch_paged(query, k_cache, v_cache, block_tables, context_lens, qsl, out, scale,
                  sliding_window, softcap, suffix_splits, kv_start=groups.seq_prefix_len,
                  pacc=pacc, plse=plse, split_offset=prefix_splits)
    _launch_merge(pacc, plse, out, ns, d, d_pad)
    return out


def shared_prefix_decode_torch(query, k_cache, v_cache, block_tables, context_lens, *, scale,
                               groups=None, sliding_window=None, softcap=None, out=None, **_):
    """Torch counterpart of shared_prefix_decode (same result; no prefix reuse): the CPU path."""
    from .paged_attention import paged_attention_torch
    _check_decode(query, block_tables)
    qsl = torch.arange(block_tables.shape[0] + 1, dtype=torch.int32, device=query.device)
    return paged_attention_torch(query, k_cache, v_cache, block_tables, context_lens, qsl,
                                 scale=scale, sliding_window=sliding_window, softcap=softcap,
                                 out=out)
