"""Shared-prefix decode: read a prefix shared by a group of sequences once for the whole group.

Beams and samples forked from one prompt hold the same leading block ids (copy-on-write). For a
decode step (one query per sequence) the attention of sequence s splits into its shared prefix
(the group's common full blocks) and its own remaining keys; the two parts are merged by
log-sum-exp, like FlashInfer's cascade / Hydragen:

    groups = find_prefix_groups(block_tables, context_lens, block_size)   # once per decode step
    out = shared_prefix_decode(query, k_cache, v_cache, block_tables, context_lens,
                               scale=scale, groups=groups)                 # every layer

One launch does both parts (a cascade, with split-KV on both): its first programs each take a row
tile (default 64 rows = group members x the GQA heads of one KV head; chunks of up to 64 members)
against one split of the group's shared prefix, so the prefix is read from memory once per KV head,
not once per sequence, and the splits fill the GPU; its other programs attend each sequence to its
own keys (from its prefix length on; sequences in no group: all keys). A second small kernel merges
the partials (kept in the query's dtype, their log-sum-exps in fp32). No host sync and no fill:
CUDA-graph safe. The prefix splits are cut in-kernel from each chunk's runtime prefix length and
padding chunks (count 0) exit at once, so a launch whose config comes from the shapes alone (a
PrefixGroups with ``max_prefix_len=None``, its tensors refilled in place every step) can be
captured once and replayed for any groups within its capacity. Computes the same function as
``paged_attention`` on decode batches. Host-side grouping of Python block-id lists (the engine's):
``group_shared_prefixes``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import pdl
from .paged_attention import (
    HAS_TRITON, _KERNEL_DTYPES, _check_cache_strides, _check_common, _check_out, _check_triton,
    _dot_f32, _next_pow2, _num_sms, choose_num_splits,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .paged_attention import _attend_tiles

__all__ = ["PrefixGroups", "GroupLayout", "find_prefix_groups", "group_shared_prefixes",
           "layout_groups", "prefix_groups_to_device", "shared_prefix_decode",
           "shared_prefix_decode_torch"]


@dataclass
class PrefixGroups:
    """Groups of decode sequences sharing leading blocks; compute once per step, reuse per layer.

    Device tensors (int32): ``members`` [M] sequence ids, grouped; ``chunk_start`` [C] offset into
    ``members`` of each chunk (a chunk = up to members_per_chunk members of one group; the kernel
    cuts its rows into row tiles); ``chunk_count`` [C] (0: a padding chunk, whose programs exit at
    once); ``chunk_prefix_len`` [C] shared tokens of the chunk's group; ``seq_prefix_len`` [S]
    shared tokens of each sequence (0 if in no group).
    Python: ``groups`` list of (member ids, shared blocks), None for a capacity-padded layout whose
    tensors are refilled every step (CUDA graphs); ``members_per_chunk``; ``max_chunk_members``
    (the launch's rows per chunk: a capacity, >= every chunk's count); ``max_prefix_len`` and
    ``max_suffix_len`` (tokens) for choosing split counts, None when unknown at launch time (the
    split counts then follow from the shapes alone, so the launch is the same for any lengths).
    """

    members: torch.Tensor
    chunk_start: torch.Tensor
    chunk_count: torch.Tensor
    chunk_prefix_len: torch.Tensor
    seq_prefix_len: torch.Tensor
    groups: list | None
    members_per_chunk: int
    max_chunk_members: int
    max_prefix_len: int | None
    max_suffix_len: int | None

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_start.shape[0])


@dataclass
class GroupLayout:
    """The flat host-side lists behind PrefixGroups' tensors (see there), before any padding."""

    members: list[int]
    chunk_start: list[int]
    chunk_count: list[int]
    chunk_prefix_len: list[int]
    seq_prefix_len: list[int]

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_start)

    @property
    def max_chunk_members(self) -> int:
        return max(self.chunk_count, default=0)


def group_shared_prefixes(block_ids: Sequence[Sequence[int]], context_lens: Sequence[int],
                          block_size: int, min_group: int = 2) -> list[tuple[tuple[int, ...], int]]:
    """Groups of sequences whose leading block ids are identical: [(member ids, shared blocks)].

    block_ids: each sequence's block ids (entries past its full blocks never change the result:
    padded tensor rows are fine). Sequences are bucketed by their first
    block id; a bucket of >= ``min_group`` sequences shares the longest common run of leading
    block ids, capped at the smallest member's number of full blocks (context_len // block_size:
    every shared key is then valid for every member). The common run of a bucket is that of its
    lexicographically smallest and largest rows (all rows between them agree where those two do),
    so the cost is a few C-level list comparisons per bucket, not a Python loop over all blocks.
    """
    n = len(block_ids)
    if n and min(context_lens) >= block_size and all(map(len, block_ids)) \
            and len({ids[0] for ids in block_ids}) == 1:
        buckets = {block_ids[0][0]: list(range(n))}  # one prompt behind every row: no per-row loop
    else:
        buckets: dict[int, list[int]] = {}
        for i, (ids, ctx) in enumerate(zip(block_ids, context_lens)):
            if ctx >= block_size and len(ids):
                buckets.setdefault(ids[0], []).append(i)
    groups = []
    for members in buckets.values():
        if len(members) < min_group:
            continue
        rows = [block_ids[i] for i in members]
        full = min(min(context_lens[i] for i in members) // block_size, min(map(len, rows)))
        lo, hi = min(rows), max(rows)
        if lo[:full] == hi[:full]:  # (usual for beams and samples: one C-level comparison)
            shared = full
        else:  # bisection: lo and hi agree on `shared` blocks and differ within `differ`
            shared, differ = 1, full
            while differ - shared > 1:
                middle = (shared + differ) // 2
                if lo[:middle] == hi[:middle]:
                    shared = middle
                else:
                    differ = middle
        groups.append((tuple(members), shared))
    return groups


def layout_groups(groups: Sequence[tuple[tuple[int, ...], int]], num_seqs: int, block_size: int,
                  members_per_chunk: int = 64) -> GroupLayout:
    """Cut groups into chunks of at most ``members_per_chunk`` members, as flat lists."""
    members, cstart, ccount, cplen = [], [], [], []
    seq_plen = [0] * num_seqs
    for mem, nblk in groups:
        base = len(members)
        members.extend(mem)
        for j in range(0, len(mem), members_per_chunk):
            cstart.append(base + j)
            ccount.append(min(members_per_chunk, len(mem) - j))
            cplen.append(nblk * block_size)
        for i in mem:
            seq_plen[i] = nblk * block_size
    return GroupLayout(members, cstart, ccount, cplen, seq_plen)


def prefix_groups_to_device(groups: Sequence[tuple[tuple[int, ...], int]],
                            context_lens: Sequence[int], block_size: int, device: torch.device,
                            members_per_chunk: int = 64) -> PrefixGroups:
    """PrefixGroups (tensors on ``device``) of groups from group_shared_prefixes."""
    lay = layout_groups(groups, len(context_lens), block_size, members_per_chunk)

    def t(x):
        return torch.tensor(x, dtype=torch.int32).to(device)

    return PrefixGroups(
        members=t(lay.members), chunk_start=t(lay.chunk_start), chunk_count=t(lay.chunk_count),
        chunk_prefix_len=t(lay.chunk_prefix_len), seq_prefix_len=t(lay.seq_prefix_len),
        groups=list(groups), members_per_chunk=members_per_chunk,
        max_chunk_members=lay.max_chunk_members, max_prefix_len=max(lay.chunk_prefix_len, default=0),
        max_suffix_len=max((c - p for c, p in zip(context_lens, lay.seq_prefix_len)), default=0))


def find_prefix_groups(block_tables, context_lens, block_size, min_group=2, members_per_chunk=64):
    """Group sequences whose leading block ids are identical (host-side, one sync).

    block_tables [S, max_blocks] int32; context_lens [S] int32 (tokens incl. the current one).
    The groups are those of group_shared_prefixes (bucketed by first block id, shared blocks
    capped at the smallest member's full blocks). Returns a PrefixGroups whose tensors live on
    block_tables' device.
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
    ctx = context_lens.tolist()
    groups = group_shared_prefixes(block_tables.tolist(), ctx, block_size, min_group)
    return prefix_groups_to_device(groups, ctx, block_size, block_tables.device, members_per_chunk)


if HAS_TRITON:

    @triton.jit
    def _split_range(kv_lo, kv_hi, split, TILE_N: tl.constexpr, SPLITS: tl.constexpr):
        """Key tiles [lo, hi) of split ``split`` when [kv_lo, kv_hi) is cut into SPLITS pieces."""
        tile_lo = kv_lo // TILE_N
        tile_hi = (kv_hi + TILE_N - 1) // TILE_N
        per = (tile_hi - tile_lo + SPLITS - 1) // SPLITS
        lo = tile_lo + split * per
        return lo, tl.minimum(lo + per, tile_hi)

    @triton.jit
    def _store_partial(acc, m_i, l_i, PACC, PLSE, pbase, row_valid,
                       D: tl.constexpr, D_PAD: tl.constexpr):
        """Normalised partial output (in PACC's dtype) and its fp32 base-2 log-sum-exp (-inf when
        empty)."""
        offs_d = tl.arange(0, D_PAD)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(PACC + pbase[:, None] + offs_d[None, :],
                 (acc / l_safe[:, None]).to(PACC.dtype.element_ty),
                 mask=row_valid[:, None] & (offs_d[None, :] < D))
        tl.store(PLSE + pbase // D_PAD, lse, mask=row_valid)

    @triton.jit
    def _attend_to_partial(q, k_base, v_base, bt_row, tile_lo, tile_hi, kv_lo, kv_hi, qpos,
                           stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, softcap, window,
                           PACC, PLSE, pbase, row_valid, BLOCK_M: tl.constexpr, D: tl.constexpr,
                           D_PAD: tl.constexpr, BS: tl.constexpr, TILE_N: tl.constexpr,
                           HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr,
                           DOT_F32: tl.constexpr):
        """Attend q's rows to key tiles [tile_lo, tile_hi) (keys kv_lo <= pos < kv_hi, K loaded
        as [N, D] rows) from a fresh softmax state and store the partial and its lse at pbase
        (one split's slot)."""
        offs_d = tl.arange(0, D_PAD)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        every_row = tl.full([BLOCK_M], 1, tl.int1)  # padding rows need no mask: they are never stored
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_base, v_base, bt_row, tile_lo, tile_hi, kv_lo, kv_hi, qpos, every_row,
            offs_d, offs_d < D, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, softcap, window,
            BS, TILE_N, HAS_SOFTCAP, HAS_WINDOW, False, PREC, DOT_F32, True)
        _store_partial(acc, m_i, l_i, PACC, PLSE, pbase, row_valid, D, D_PAD)

    @triton.jit
    def _prefix_part(w, Q, K, V, BT, CTX, MEMBERS, CSTART, CCOUNT, CPLEN, PACC, PLSE,
                     qk_scale, softcap, window, stride_qt, stride_qh, stride_kb, stride_kt,
                     stride_kh, stride_vb, stride_vt, stride_vh, stride_bt, stride_pt, stride_ph,
                     HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                     D_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                     TILE_N: tl.constexpr, ROW_TILES: tl.constexpr, SPLITS: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr,
                     DOT_F32: tl.constexpr):
        """Work item w = ((chunk * HKV + kv head) * SPLITS + split) * ROW_TILES + row tile: the
        rows (member x GQA head) of one row tile against one split of the chunk's shared prefix.
        Row tiles of one (chunk, head, split) are adjacent so they run together and share the
        prefix tiles through L2."""
        r = w % ROW_TILES
        w = w // ROW_TILES
        split = w % SPLITS
        w = w // SPLITS
        kvh = w % HKV
        c = w // HKV
        cstart = tl.load(CSTART + c)
        count = tl.load(CCOUNT + c)
        plen = tl.load(CPLEN + c)
        MEMBERS_PER_TILE: tl.constexpr = BLOCK_M // G_PAD
        if r * MEMBERS_PER_TILE < count:
            offs_m = tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, D_PAD)
            i = r * MEMBERS_PER_TILE + offs_m // G_PAD
            h = offs_m % G_PAD
            row_valid = (h < G) & (i < count)
            seq = tl.load(MEMBERS + cstart + i, mask=row_valid, other=0).to(tl.int64)
            head = kvh * G + h
            qpos = tl.load(CTX + seq, mask=row_valid, other=1) - 1
            q = tl.load(Q + seq[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                        mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
            kv_lo = 0
            if HAS_WINDOW:  # keys before every row's window are skipped; the rest masked per row
                kv_lo = tl.maximum(0, tl.min(tl.where(row_valid, qpos, 2147483647), 0) - window + 1)
            tile_lo, tile_hi = _split_range(kv_lo, plen, split, TILE_N, SPLITS)
            leader = tl.load(MEMBERS + cstart).to(tl.int64)
            _attend_to_partial(
                q, K + kvh * stride_kh, V + kvh * stride_vh, BT + leader * stride_bt, tile_lo, tile_hi,
                kv_lo, plen, qpos, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, softcap, window,
                PACC, PLSE, seq * stride_pt + head * stride_ph + split * D_PAD, row_valid,
                BLOCK_M, D, D_PAD, BS, TILE_N, HAS_SOFTCAP, HAS_WINDOW, PREC, DOT_F32)

    @triton.jit
    def _suffix_part(w, Q, K, V, BT, CTX, SEQ_PLEN, PACC, PLSE,
                     qk_scale, softcap, window, stride_qt, stride_qh, stride_kb, stride_kt,
                     stride_kh, stride_vb, stride_vt, stride_vh, stride_bt, stride_pt, stride_ph,
                     HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                     D_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                     TILE_N: tl.constexpr, SPLITS: tl.constexpr, SPLIT_OFFSET: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr,
                     DOT_F32: tl.constexpr):
        """Work item w = (seq * HKV + kv head) * SPLITS + split: the GQA heads of one sequence
        against one split of its own keys (from its shared-prefix length to its end)."""
        split = w % SPLITS
        w = w // SPLITS
        kvh = w % HKV
        seq = (w // HKV).to(tl.int64)
        ctx = tl.load(CTX + seq)
        kv_lo = tl.load(SEQ_PLEN + seq)
        if HAS_WINDOW:
            kv_lo = tl.maximum(kv_lo, ctx - window)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        row_valid = offs_m < G
        head = kvh * G + offs_m
        q = tl.load(Q + seq * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        qpos = tl.zeros([BLOCK_M], dtype=tl.int32) + ctx - 1
        tile_lo, tile_hi = _split_range(kv_lo, ctx, split, TILE_N, SPLITS)
        _attend_to_partial(
            q, K + kvh * stride_kh, V + kvh * stride_vh, BT + seq * stride_bt, tile_lo, tile_hi,
            kv_lo, ctx, qpos, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, softcap, window,
            PACC, PLSE, seq * stride_pt + head * stride_ph + (SPLIT_OFFSET + split) * D_PAD, row_valid,
            BLOCK_M, D, D_PAD, BS, TILE_N, HAS_SOFTCAP, HAS_WINDOW, PREC, DOT_F32)

    @triton.jit
    def _cascade_kernel(
        Q, K, V, BT, CTX, MEMBERS, CSTART, CCOUNT, CPLEN, SEQ_PLEN, PACC, PLSE,
        num_prefix_programs, qk_scale, softcap, window,
        stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_bt, stride_pt, stride_ph,
        HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        D_PAD: tl.constexpr, BS: tl.constexpr,
        PREFIX_M: tl.constexpr, PREFIX_TILE: tl.constexpr, ROW_TILES: tl.constexpr,
        PREFIX_SPLITS: tl.constexpr, SUFFIX_M: tl.constexpr, SUFFIX_TILE: tl.constexpr,
        SUFFIX_SPLITS: tl.constexpr, ROLE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
    ):
        """Both passes, writing split-KV partials that _cascade_merge_kernel combines.
        ROLE 0: one launch, the first num_prefix_programs programs attend to shared prefixes
        (long, so they start first), the rest to each sequence's own keys. ROLE 1 / 2: prefix /
        own keys only (two launches, each compiled with its own registers and warps)."""
        if PDL:  # (see pdl.py) everything here may be the previous kernel's output
            tl.extra.cuda.gdc_wait()
        pid = tl.program_id(0)
        if ROLE == 0:
            is_prefix = pid < num_prefix_programs
        else:
            is_prefix = ROLE == 1
        if is_prefix:
            _prefix_part(pid, Q, K, V, BT, CTX, MEMBERS, CSTART, CCOUNT, CPLEN, PACC, PLSE,
                         qk_scale, softcap, window, stride_qt, stride_qh, stride_kb, stride_kt,
                         stride_kh, stride_vb, stride_vt, stride_vh, stride_bt, stride_pt,
                         stride_ph, HKV, G, G_PAD, D, D_PAD, BS, PREFIX_M, PREFIX_TILE, ROW_TILES,
                         PREFIX_SPLITS, HAS_SOFTCAP, HAS_WINDOW, PREC, DOT_F32)
        else:
            _suffix_part(pid - num_prefix_programs, Q, K, V, BT, CTX, SEQ_PLEN, PACC, PLSE,
                         qk_scale, softcap, window, stride_qt, stride_qh, stride_kb, stride_kt,
                         stride_kh, stride_vb, stride_vt, stride_vh, stride_bt, stride_pt,
                         stride_ph, HKV, G, G_PAD, D, D_PAD, BS, SUFFIX_M, SUFFIX_TILE,
                         SUFFIX_SPLITS, PREFIX_SPLITS, HAS_SOFTCAP, HAS_WINDOW, PREC, DOT_F32)

    @triton.jit
    def _cascade_merge_kernel(PACC, PLSE, SEQ_PLEN, OUT, stride_pt, stride_ph, stride_ot,
                              stride_oh, HQ: tl.constexpr, NS: tl.constexpr,
                              PREFIX_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                              D_PAD: tl.constexpr):
        """out[seq, heads] = the log-sum-exp-weighted mean of their partials, for BLOCK_H heads of
        one sequence per program (a [BLOCK_H, D] tile per split: one program per (sequence, head)
        was 8,192 tiny programs at W-shared 256's shape). The prefix slots of a sequence in no
        group were never written (torch.empty): they are not read at all."""
        seq = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, D_PAD)
        rows = head < HQ
        d_mask = offs_d < D
        first = tl.where(tl.load(SEQ_PLEN + seq) > 0, 0, PREFIX_SPLITS)
        base = seq * stride_pt + head * stride_ph  # each row's slot 0
        m = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
        den = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, D_PAD], dtype=tl.float32)
        first = tl.zeros([BLOCK_H], dtype=tl.int32) + first
        for slot in tl.static_range(NS):
            # masked, not branched on: the unrolled loads can all be in flight at once (empty
            # splits hold lse -inf and a zero partial: weight 0)
            live = rows & (first <= slot)
            lse = tl.load(PLSE + base // D_PAD + slot, mask=live, other=float("-inf"))
            part = tl.load(PACC + base[:, None] + slot * D_PAD + offs_d[None, :],
                           mask=live[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha[:, None] + part * w[:, None]
            den = den * alpha + w
            m = m_new
        den = tl.where(den == 0.0, 1.0, den)
        tl.store(OUT + seq * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 (acc / den[:, None]).to(OUT.dtype.element_ty), mask=rows[:, None] & d_mask[None, :])


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


MERGE_HEADS = 8  # heads of one sequence per program of the merge

_CONFIG_KEYS = {"prefix_m", "prefix_tile", "suffix_tile", "num_warps", "num_stages", "separate",
                "suffix_warps", "part", "merge_heads", "half_partials", "maxnreg"}


def _launch_config(groups: PrefixGroups, s: int, hkv: int, g_pad: int, d_pad: int,
                   dtype: torch.dtype, device: torch.device, prefix_splits, suffix_splits,
                   cfg: dict | None) -> dict:
    """Tile sizes and split counts of one cascade launch; ``cfg`` overrides the defaults, for
    benchmarks: prefix_m (rows per prefix program), prefix_tile / suffix_tile (keys per tile),
    num_warps, num_stages, separate (prefix and own keys in two launches, the latter with
    suffix_warps warps), part ("prefix" or "own": launch that part alone and no merge, an
    incomplete result that only times the part), merge_heads (heads of a sequence per program
    of the merge, a power of two), half_partials (False: fp32 split partials for 16-bit
    queries), maxnreg (registers per thread of the main kernel; None: no cap)."""
    cfg = dict(cfg or {})
    if set(cfg) - _CONFIG_KEYS:
        raise ValueError(f"_config has unknown keys {sorted(set(cfg) - _CONFIG_KEYS)}")
    wide = d_pad > 128 or dtype == torch.float32  # bigger K/V tiles: fewer keys per tile
    rows = groups.max_chunk_members * g_pad        # one chunk's query rows for one KV head
    # 64 rows x 32-key tiles: few enough registers for 3 programs per SM, so own-key programs
    # run beside the (compute-heavy) prefix programs; measured best on the H100 (NOTES-kernels)
    prefix_m = cfg.get("prefix_m") or max(16, g_pad, min(_next_pow2(rows), 64))
    if prefix_m < max(16, g_pad) or prefix_m & (prefix_m - 1):
        raise ValueError(f"_config prefix_m must be a power of two >= {max(16, g_pad)}, got {prefix_m}")
    c = {"prefix_m": prefix_m, "row_tiles": -(-rows // prefix_m),
         "prefix_tile": cfg.get("prefix_tile") or 32,
         "suffix_m": max(16, g_pad), "suffix_tile": cfg.get("suffix_tile") or (32 if wide else 64),
         "num_warps": cfg.get("num_warps") or (8 if prefix_m >= 128 else 4),
         # 2 stages: as fast or faster than the default (3) at every shape of bench_cascade_shapes,
         # in two runs (921c890, cb8f2f0): 13.1-13.5 against 14.2-14.3 us at W-sample 64's shape
         "num_stages": cfg.get("num_stages") or 2, "separate": bool(cfg.get("separate", False)),
         "suffix_warps": cfg.get("suffix_warps") or 4, "part": cfg.get("part"),
         "merge_heads": cfg.get("merge_heads") or (4 if d_pad <= 64 else MERGE_HEADS),
         # partials in the query's 16-bit dtype: half the bytes written and merged, and each is a
         # weighted mean of values, so it cannot overflow. 2-7% faster at the engine's shapes
         # (bench_cascade_shapes, 752422f); error 3.0e-3 against 2.3e-3 with fp32 partials
         "half_partials": bool(cfg.get("half_partials", True)) and dtype != torch.float32}
    # A register cap lets more programs share an SM: the prefix and own-key programs are
    # latency-bound (Nsight Compute, 752422f: 8 warps active an SM, 3 programs of 152 registers).
    # 96 registers at head_dim <= 64 fit 5 programs of 4 warps, 128 at 128 fit 4; measured
    # -8 to -13% at M1's shapes and, with more prefix splits, -9% at W-kernel's (NOTES-kernels)
    capped = not wide and c["num_warps"] == 4
    c["maxnreg"] = cfg.get("maxnreg", (96 if d_pad <= 64 else 128) if capped else None)
    if c["merge_heads"] & (c["merge_heads"] - 1):
        raise ValueError(f"_config merge_heads must be a power of two, got {c['merge_heads']}")
    if c["part"] not in (None, "prefix", "own"):
        raise ValueError(f"_config part must be 'prefix' or 'own', got {c['part']!r}")
    if prefix_splits is None:  # about two waves of prefix programs, >= 256 prefix keys each
        base = groups.num_chunks * c["row_tiles"] * hkv
        # with 4 programs an SM (the 128-register cap), prefix programs for two thirds of the
        # slots: 11 splits at W-kernel's shape (37.7-38.2 us against 40.5 with 9 and 38.5-38.8
        # with 12); at head_dim 64 two waves stayed best (W-shared 256: 3 splits, 43 us; 4: 46)
        waves = 8 / 3 if c["maxnreg"] == 128 else 2
        prefix_splits = max(1, min(-(-int(waves * _num_sms(device)) // base), 64))
        if groups.max_prefix_len is not None:  # else: fixed by the shapes (CUDA graphs)
            prefix_splits = max(1, min(prefix_splits, -(-groups.max_prefix_len // 256)))
            tiles = -(-groups.max_prefix_len // c["prefix_tile"])
            prefix_splits = -(-tiles // -(-tiles // prefix_splits))  # no split left empty
    if suffix_splits is None:
        suffix_splits = choose_num_splits(s, hkv, device, groups.max_suffix_len)
    for name, val in (("prefix_splits", prefix_splits), ("suffix_splits", suffix_splits)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    c["prefix_splits"], c["suffix_splits"] = prefix_splits, suffix_splits
    return c


def _alloc_scratch(s: int, hq: int, ns: int, d_pad: int, device: torch.device,
                   acc_dtype: torch.dtype):
    """Partials acc [S, Hq, NS, D_PAD] (normalised: each is a weighted mean of values, so a 16-bit
    dtype holds it without overflow) and fp32 base-2 lse [S, Hq, NS]. No fill: every slot the
    merge reads is written (the prefix slots of sequences in no group are never read)."""
    pacc = torch.empty((s, hq, ns, d_pad), dtype=acc_dtype, device=device)
    plse = torch.empty((s, hq, ns), dtype=torch.float32, device=device)
    return pacc, plse


def _launch_cascade(query, k_cache, v_cache, block_tables, context_lens, groups, out, scale,
                    sliding_window, softcap, c: dict) -> None:
    """Prefix + own-key partials in one kernel (or two with c["separate"]), then the merge."""
    s, hq, d = query.shape
    _, bs, hkv, _ = k_cache.shape
    g = hq // hkv
    d_pad = max(16, _next_pow2(d))
    ns = c["prefix_splits"] + c["suffix_splits"]
    pacc, plse = _alloc_scratch(s, hq, ns, d_pad, query.device,
                                query.dtype if c["half_partials"] else torch.float32)
    n_prefix = groups.num_chunks * hkv * c["prefix_splits"] * c["row_tiles"]
    n_suffix = s * hkv * c["suffix_splits"]
    args = (query, k_cache, v_cache, block_tables, context_lens, groups.members,
            groups.chunk_start, groups.chunk_count, groups.chunk_prefix_len, groups.seq_prefix_len,
            pacc, plse)
    scalars = (float(scale), float(softcap or 1.0), int(sliding_window or 0),
               query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
               k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
               block_tables.stride(0), pacc.stride(0), pacc.stride(1))
    meta = dict(
        HKV=hkv, G=g, G_PAD=_next_pow2(g), D=d, D_PAD=d_pad, BS=bs,
        PREFIX_M=c["prefix_m"], PREFIX_TILE=c["prefix_tile"], ROW_TILES=c["row_tiles"],
        PREFIX_SPLITS=c["prefix_splits"], SUFFIX_M=c["suffix_m"], SUFFIX_TILE=c["suffix_tile"],
        SUFFIX_SPLITS=c["suffix_splits"], HAS_SOFTCAP=softcap is not None,
        HAS_WINDOW=sliding_window is not None,
        PREC="ieee" if query.dtype == torch.float32 else None, DOT_F32=_dot_f32(query.dtype),
        PDL=pdl.applies(query.device))
    meta.update(pdl.launch_options(meta["PDL"]), num_stages=c["num_stages"])
    if c["maxnreg"]:
        meta["maxnreg"] = c["maxnreg"]
    if c["part"] == "prefix":  # timing a part alone (benchmarks): no merge
        _cascade_kernel[(n_prefix,)](*args, n_prefix, *scalars, ROLE=1, num_warps=c["num_warps"], **meta)
        return
    if c["part"] == "own":
        _cascade_kernel[(n_suffix,)](*args, 0, *scalars, ROLE=2, num_warps=c["suffix_warps"], **meta)
        return
    if c["separate"]:
        _cascade_kernel[(n_prefix,)](*args, n_prefix, *scalars, ROLE=1,
                                     num_warps=c["num_warps"], **meta)
        _cascade_kernel[(n_suffix,)](*args, 0, *scalars, ROLE=2,
                                     num_warps=c["suffix_warps"], **meta)
    else:
        _cascade_kernel[(n_prefix + n_suffix,)](*args, n_prefix, *scalars, ROLE=0,
                                                num_warps=c["num_warps"], **meta)
    block_h = min(_next_pow2(hq), c["merge_heads"])
    _cascade_merge_kernel[(s, -(-hq // block_h))](
        pacc, plse, groups.seq_prefix_len, out, pacc.stride(0), pacc.stride(1), out.stride(0),
        out.stride(1), HQ=hq, NS=ns, PREFIX_SPLITS=c["prefix_splits"], BLOCK_H=block_h, D=d,
        D_PAD=d_pad, num_warps=2)


def shared_prefix_decode(query, k_cache, v_cache, block_tables, context_lens, *, scale,
                         groups=None, sliding_window=None, softcap=None, out=None,
                         prefix_splits=None, suffix_splits=None, max_context_len=None,
                         _config=None):
    """Decode attention (one query per sequence) reading each group's shared prefix once.

    query [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables
    [S, max_blocks] int32; context_lens [S] int32 (incl. the current token, already in the
    cache); groups from find_prefix_groups (computed here, with a host sync, if None).
    Returns out [S, Hq, D], the same as paged_attention on a decode batch.

    Two launches, no host sync, no fill (CUDA-graph safe, see the module docstring): one kernel
    whose first programs attend the rows (members x GQA heads, 64 per program by default) of each
    group's chunk to one split of the shared prefix, and whose other programs attend each
    sequence to its own keys; then a merge by log-sum-exp. ``prefix_splits`` / ``suffix_splits`` override
    the split counts, ``_config`` the tile sizes (benchmarks).
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
    if groups.num_chunks == 0:
        from .paged_attention import paged_attention
        qsl = torch.arange(s + 1, dtype=torch.int32, device=query.device)
        if suffix_splits is None:
            suffix_splits = choose_num_splits(s, hkv, query.device, max_context_len)
        return paged_attention(query, k_cache, v_cache, block_tables, context_lens, qsl,
                               scale=scale, sliding_window=sliding_window, softcap=softcap,
                               out=out, num_splits=suffix_splits)
    c = _launch_config(groups, s, hkv, _next_pow2(hq // hkv), max(16, _next_pow2(d)),
                       query.dtype, query.device, prefix_splits, suffix_splits, _config)
    _launch_cascade(query, k_cache, v_cache, block_tables, context_lens, groups, out, scale,
                    sliding_window, softcap, c)
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
