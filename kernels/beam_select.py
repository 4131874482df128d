"""Beam search's device work between two forwards, in two Triton launches (CUDA only).

    flat = beam_candidates(row_values, row_tokens, running, eos, vocab, num_beams)
    rows, copy_src, tokens, scores = fork_beam_rows(flat, order, previous, columns, tails, copy,
                                                    vocab, num_beams)

`beam_candidates`, one program per request: each of its k rows brings its best `keep` tokens
(`row_values` [R*k, keep] log-probabilities after the processors, `row_tokens` their ids, from a
per-row top-k); with the row's running score added, the request's best `keep` of the k * keep
candidates are HF's top-K (`topk(scores.view(batch, k * V), keep)`: a candidate that makes the
request's top `keep` is among its own row's best `keep`). Then HF's choice of the beams that keep
running: the best k after candidates ending in EOS are pushed down by -1e9. Output, per request,
one float64 row [2 * keep + 2 * k]: the top-K scores, their flat indices (beam * vocab + token),
the chosen candidates' positions among them and their running scores: the layout beam search's
host part reads (`BeamRequest._select`), in one transfer.

`fork_beam_rows`, one program per new beam: the block table of a step launched before the host has
read `flat` (beam search ahead): the chosen candidate's parent row of the previous step's tables
(`previous`), with the reserved block `tails[i]` in column `columns[i]`, the parent's block there as
the copy-on-write source when `copy[i]` (a partial block to carry over), the token to feed and the
running score to start the next step from.

Order of ties: candidates with equal scores are ranked by position (row, then the row's own top-k
order), a deterministic order where the GPU's `topk` has its own; the host takes the choice from
here, so host and device agree. NaN scores are ranked as -inf. The torch references
(`*_torch`) define the same functions with a stable sort; the CPU path of beam search keeps HF's
flat `topk` instead (exact HF semantics, ties included).

Why: beam search's device part was ~25 small torch ops per step and the forked tables of a step
launched ahead ~20 more; each costs 10-30 us of host time on the H100 machine, which made the host,
not the GPU, the bottleneck of a step launched ahead (bench/NOTES.md, item 32).
"""
from __future__ import annotations

import torch

from .paged_attention import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["beam_candidates", "beam_candidates_torch", "fork_beam_rows", "fork_beam_rows_torch",
           "MAX_CANDIDATES"]

NEG = -1.0e9  # HF's score for a beam that may not run on (exact in float32)
MAX_CANDIDATES = 2048  # k * keep per request: the ranking is quadratic in it


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _check_candidates(row_values, row_tokens, running, eos, vocab, num_beams) -> int:
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if row_values.dim() != 2 or row_values.dtype != torch.float32:
        raise ValueError(f"row_values must be float32 [R * k, keep], got {row_values.dtype} "
                         f"{tuple(row_values.shape)}")
    rows, keep = row_values.shape
    if rows % num_beams or keep < num_beams:
        raise ValueError(f"row_values {tuple(row_values.shape)} must hold k={num_beams} rows per request "
                         f"and keep >= k columns")
    if row_tokens.shape != row_values.shape or running.shape != (rows,) or running.dtype != torch.float32:
        raise ValueError(f"row_tokens {tuple(row_tokens.shape)} and running {tuple(running.shape)} "
                         f"must match row_values {tuple(row_values.shape)}")
    if eos.dim() != 1:
        raise ValueError(f"eos must be 1-D, got {tuple(eos.shape)}")
    if not isinstance(vocab, int) or vocab < keep:
        raise ValueError(f"vocab must be an int >= keep ({keep}), got {vocab!r}")
    return keep


def beam_candidates_torch(row_values: torch.Tensor, row_tokens: torch.Tensor, running: torch.Tensor,
                          eos: torch.Tensor, vocab: int, num_beams: int) -> torch.Tensor:
    """Reference of `beam_candidates` (same layout, same order of ties)."""
    keep = _check_candidates(row_values, row_tokens, running, eos, vocab, num_beams)
    k = num_beams
    requests = row_values.shape[0] // k
    scores = row_values + running[:, None]
    scores = torch.where(torch.isnan(scores), float("-inf"), scores).reshape(requests, k * keep)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    values = scores.gather(1, order)
    beams = torch.div(order, keep, rounding_mode="floor")
    tokens = row_tokens.reshape(requests, k * keep).gather(1, order)
    ends = torch.isin(tokens, eos)
    run = torch.where(ends, values + NEG, values)
    chosen = torch.sort(run, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.cat([values.double(), (beams * vocab + tokens).double(), chosen.double(),
                      run.gather(1, chosen).double()], dim=1)


def beam_candidates(row_values: torch.Tensor, row_tokens: torch.Tensor, running: torch.Tensor,
                    eos: torch.Tensor, vocab: int, num_beams: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring. Returns float64 [R, 2 * keep + 2 * k] (in `out` when given)."""
    keep = _check_candidates(row_values, row_tokens, running, eos, vocab, num_beams)
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use beam_candidates_torch")
    k = num_beams
    count = k * keep
    if count > MAX_CANDIDATES:
        raise ValueError(f"num_beams * keep = {count} candidates per request; at most {MAX_CANDIDATES}")
    requests = row_values.shape[0] // k
    shape = (requests, 2 * keep + 2 * k)
    if out is None:
        out = torch.empty(shape, dtype=torch.float64, device=row_values.device)
    elif out.shape != shape or out.dtype != torch.float64 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float64 tensor of shape {shape}")
    if requests == 0:
        return out
    count_p2 = max(16, _next_pow2(count))
    _beam_candidates_kernel[(requests,)](
        row_values, row_tokens, running, eos.to(torch.int64), out, vocab, eos.numel(),
        K=k, KEEP=keep, COUNT_P2=count_p2, KEEP_P2=max(16, _next_pow2(keep)),
        CHUNK=max(1, 4096 // count_p2), num_warps=4)
    return out


def _check_fork(flat, order, previous, columns, tails, copy, num_beams: int, width: int) -> int:
    k = num_beams
    if flat.dim() != 2 or flat.dtype != torch.float64 or flat.shape[1] % 2 or flat.shape[1] < 4 * k:
        raise ValueError(f"flat must be beam_candidates' float64 [R, 2 * keep + 2 * k], got {flat.dtype} "
                         f"{tuple(flat.shape)}")
    n = columns.numel()
    if n != order.numel() * k or tails.shape != columns.shape or copy.shape != columns.shape:
        raise ValueError(f"{order.numel()} requests of {k} beams need {order.numel() * k} columns, tails and "
                         f"copy flags; got {columns.numel()}, {tails.numel()}, {copy.numel()}")
    if previous.dim() != 2 or previous.dtype != torch.int32:
        raise ValueError(f"previous must be int32 [rows, width], got {previous.dtype} {tuple(previous.shape)}")
    if not isinstance(width, int) or width < previous.shape[1]:
        raise ValueError(f"width must be an int >= the previous tables' width {previous.shape[1]} (and > "
                         f"every column), got {width!r}")
    return (flat.shape[1] - 2 * k) // 2


def fork_beam_rows_torch(flat, order, previous, columns, tails, copy, vocab: int, num_beams: int, width: int):
    """Reference of `fork_beam_rows`: (rows int32 [n, width], copy_src int64 [n] (-1: none),
    tokens int64 [n], running float32 [n]). `width`: the rows' width, at least the previous
    tables' and every column + 1 (the host knows it; finding it on the device would sync)."""
    keep = _check_fork(flat, order, previous, columns, tails, copy, num_beams, width)
    k = num_beams
    results = flat.index_select(0, order.long())
    chosen = results[:, 2 * keep : 2 * keep + k].long()
    picked = results[:, keep : 2 * keep].long().gather(1, chosen)
    parents = (torch.div(picked, vocab, rounding_mode="floor") + order.long()[:, None] * k).reshape(-1)
    tokens = torch.remainder(picked, vocab).reshape(-1)
    running = results[:, 2 * keep + k :].float().reshape(-1)
    rows = previous.index_select(0, parents)
    if width > previous.shape[1]:
        rows = torch.nn.functional.pad(rows, (0, width - previous.shape[1]))
    column = columns.long()[:, None]
    beyond = column.squeeze(1) >= previous.shape[1]  # a new column: nothing to copy
    source = rows.gather(1, column).squeeze(1).long().masked_fill_((copy == 0) | beyond, -1)
    rows.scatter_(1, column, tails.to(rows.dtype)[:, None])
    return rows, source, tokens, running


def fork_beam_rows(flat, order, previous, columns, tails, copy, vocab: int, num_beams: int, width: int):
    """See the module docstring and `fork_beam_rows_torch` (same outputs)."""
    keep = _check_fork(flat, order, previous, columns, tails, copy, num_beams, width)
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use fork_beam_rows_torch")
    n = columns.numel()
    device = flat.device
    rows = torch.empty((n, width), dtype=torch.int32, device=device)
    source = torch.empty(n, dtype=torch.int64, device=device)
    tokens = torch.empty(n, dtype=torch.int64, device=device)
    running = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        _fork_beam_rows_kernel[(n,)](
            flat, flat.stride(0), order, previous, previous.stride(0), previous.shape[1],
            columns, tails, copy, rows, width, source, tokens, running, vocab,
            K=num_beams, KEEP=keep, BLOCK_W=min(256, max(16, _next_pow2(width))), num_warps=1)
    return rows, source, tokens, running


if HAS_TRITON:
    NEG_SCORE = tl.constexpr(NEG)

    @triton.jit
    def _candidate_scores(vals_ptr, run_ptr, r, idx, COUNT: tl.constexpr, K: tl.constexpr,
                          KEEP: tl.constexpr):
        """Candidates `idx` of request r: row value + the row's running score (NaN as -inf)."""
        valid = idx < COUNT
        x = tl.load(vals_ptr + r * COUNT + idx, mask=valid, other=float("-inf"))
        x = x + tl.load(run_ptr + r * K + idx // KEEP, mask=valid, other=0.0)
        return tl.where(x != x, float("-inf"), x)

    @triton.jit
    def _beam_candidates_kernel(vals_ptr, toks_ptr, run_ptr, eos_ptr, out_ptr, V, E,
                                K: tl.constexpr, KEEP: tl.constexpr, COUNT_P2: tl.constexpr,
                                KEEP_P2: tl.constexpr, CHUNK: tl.constexpr):
        r = tl.program_id(0)
        COUNT: tl.constexpr = K * KEEP
        WIDTH: tl.constexpr = 2 * KEEP + 2 * K
        out = out_ptr + r * WIDTH
        # 1. The request's top KEEP of its K * KEEP candidates: each candidate's rank is the number
        # of candidates before it (larger, or equal and earlier); ranks < KEEP are written in place.
        i = tl.arange(0, COUNT_P2)
        x = _candidate_scores(vals_ptr, run_ptr, r, i, COUNT, K, KEEP)
        rank = tl.zeros([COUNT_P2], dtype=tl.int32)
        for j0 in range(0, COUNT_P2, CHUNK):
            j = j0 + tl.arange(0, CHUNK)
            y = _candidate_scores(vals_ptr, run_ptr, r, j, COUNT, K, KEEP)
            before = (y[None, :] > x[:, None]) | ((y[None, :] == x[:, None]) & (j[None, :] < i[:, None]))
            before = before & (j < COUNT)[None, :]
            rank += tl.sum(before.to(tl.int32), axis=1)
        top = (i < COUNT) & (rank < KEEP)
        token = tl.load(toks_ptr + r * COUNT + i, mask=top, other=0)
        tl.store(out + rank, x.to(tl.float64), mask=top)
        tl.store(out + KEEP + rank, ((i // KEEP) * V + token).to(tl.float64), mask=top)
        tl.debug_barrier()  # the top-K, in order, is read back by every thread below
        # 2. HF's running beams: the best K of the top KEEP after EOS candidates get NEG added.
        q = tl.arange(0, KEEP_P2)
        inside = q < KEEP
        v = tl.load(out + q, mask=inside, other=float("-inf")).to(tl.float32)
        flat_index = tl.load(out + KEEP + q, mask=inside, other=0.0).to(tl.int64)
        tok = flat_index % V
        ends = tl.zeros([KEEP_P2], dtype=tl.int32)
        for e in range(0, E):
            ends += (tok == tl.load(eos_ptr + e)).to(tl.int32)
        run = tl.where(ends > 0, v + NEG_SCORE, v)
        before = (run[None, :] > run[:, None]) | ((run[None, :] == run[:, None]) & (q[None, :] < q[:, None]))
        before = before & inside[None, :]
        crank = tl.sum(before.to(tl.int32), axis=1)
        chosen = inside & (crank < K)
        tl.store(out + 2 * KEEP + crank, q.to(tl.float64), mask=chosen)
        tl.store(out + 2 * KEEP + K + crank, run.to(tl.float64), mask=chosen)

    @triton.jit
    def _fork_beam_rows_kernel(flat_ptr, flat_stride, order_ptr, prev_ptr, prev_stride, prev_width,
                               col_ptr, tail_ptr, copy_ptr, rows_ptr, width, src_ptr, tok_ptr, run_ptr, V,
                               K: tl.constexpr, KEEP: tl.constexpr, BLOCK_W: tl.constexpr):
        i = tl.program_id(0)
        r = i // K
        j = i % K
        step_row = tl.load(order_ptr + r).to(tl.int64)
        results = flat_ptr + step_row * flat_stride
        position = tl.load(results + 2 * KEEP + j).to(tl.int64)
        flat_index = tl.load(results + KEEP + position).to(tl.int64)
        beam = flat_index // V
        parent = prev_ptr + (step_row * K + beam) * prev_stride
        column = tl.load(col_ptr + i).to(tl.int64)
        tail = tl.load(tail_ptr + i).to(tl.int32)
        for w0 in range(0, width, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            ids = tl.load(parent + w, mask=(w < width) & (w < prev_width), other=0)
            tl.store(rows_ptr + i * width + w, tl.where(w == column, tail, ids), mask=w < width)
        source = tl.load(parent + column, mask=column < prev_width, other=-1).to(tl.int64)
        tl.store(src_ptr + i, tl.where(tl.load(copy_ptr + i) != 0, source, -1))
        tl.store(tok_ptr + i, flat_index - beam * V)
        tl.store(run_ptr + i, tl.load(results + 2 * KEEP + K + j).to(tl.float32))
