"""Skinny GEMM for the decode step: y = x @ W^T (+ bias) with few activation rows and a big weight.

    skinny_linear(x, weight, bias=None, config=None) -> y        Triton (GPU, or the interpreter)
    skinny_linear_torch(x, weight, bias=None) -> y               plain-torch reference
    torch.ops.sharedecode.skinny_linear(x, weight, bias)         the same, opaque to torch.compile
    skinny_silu_linear(gate_up, weight, bias=None, config=None)  (silu(gate) * up) @ W^T (+ bias)
    skinny_silu_linear_torch, torch.ops.sharedecode.skinny_silu_linear: as above

Shapes: x [M, K] with 1 <= M <= MAX_ROWS (rows may be strided), weight [N, K] (nn.Linear layout,
K contiguous), bias [N] or None; fp16 / bf16 / fp32, all the same dtype. Accumulation is fp32,
y [M, N] is contiguous in x's dtype.

At decode, M is 1..16 and the time is the time to read W once. One program owns BLOCK_N rows of W
(and optionally one of SPLIT_K slices of K) and streams them in [BLOCK_N, BLOCK_K] tiles with
16-byte loads along K through a num_stages-deep software pipeline, multiplying each tile with the
x tile (M rows padded to 16, the smallest tl.dot) on the tensor cores. ``choose_config`` picks the
tile sizes so that there are enough programs to keep every SM streaming. With SPLIT_K > 1 the
slices write fp32 partials that the last slice to finish (or a second small kernel) sums in a fixed
order, adds the bias and casts. Nothing on the launch path reads device memory on the host and the
only allocations depend on shapes, so a call can be captured in a CUDA graph.

The gated variant is an MLP's down projection taking the fused gate|up projection's output
gate_up [M, 2I] as it is: the x tile load reads the gate and the up tile and forms
silu(gate) * up in fp32, rounded once to the input dtype (what the elementwise kernel it replaces
stores: the same bits as that kernel then skinny_linear), so the decode step loses that kernel's
launch per layer; x is tiny next to W, but the gated GEMM itself is a little slower than the
plain one, so the gain is the launch it saves (bench/NOTES.md, item 36).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import pdl
from .paged_attention import HAS_TRITON, _dot_f32, _interpreting, _next_pow2, _num_sms, arrival_counters

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["skinny_linear", "skinny_linear_torch", "skinny_silu_linear", "skinny_silu_linear_torch",
           "SkinnyConfig", "choose_config", "MAX_ROWS"]

MAX_ROWS = 16  # rows of x per call: one tl.dot tile (the M rows are padded to 16)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REDUCE_BLOCK = 256  # columns per program of the split-K reduction


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch configuration of the skinny GEMM (``choose_config`` picks one; benchmarks sweep).

    block_n / block_k: rows of W per program / elements of K per tile (powers of two >= 16).
    split_k: at most this many programs share one block of rows, each over a slice of K whose
        length is a multiple of block_k (fewer when K is short); > 1 adds the reduction kernel.
    num_warps, num_stages: as for any Triton kernel; stages = tiles of W in flight per program.
    """

    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def check(self) -> None:
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"config.{name} must be a power of two >= 16, got {v!r}")
        if not isinstance(self.split_k, int) or not 1 <= self.split_k <= 64:
            raise ValueError(f"config.split_k must be an int in 1..64, got {self.split_k!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"config.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"config.num_stages must be a positive int, got {self.num_stages!r}")


def choose_config(M: int, N: int, K: int, num_sms: int, elem_bytes: int = 2,
                  max_smem: Optional[int] = None, gated: bool = False) -> SkinnyConfig:
    """Heuristic launch config for y[M, N] = x[M, K] @ W[N, K]^T on a GPU with ``num_sms`` SMs.

    The kernel is bound by reading W, and at decode sizes (8-250 MB) by how fast all SMs get
    their share of it moving. Measured (bench/bench_skinny_gemm.py --sweep wide, H200, bf16, M1
    and M2 shapes): what wins is about one program per SM, each as fat as possible: few, wide
    tiles (128 rows x 256 bytes = 32 KB per stage), 4 stages in flight. So, among tiles
    128 x 256 B, 64 x 256 B and 32 x 512 B and split-K factors 1, 2, 4, ... (each K slice keeping
    >= 8 tiles, and splitting only for weights >= 16 MB: below that the split configs this rule
    would pick lost to one launch of 32 x 512 B tiles), take the one whose program count is
    nearest to ``num_sms`` (log scale), on a tie the widest tile. BLOCK_N 16 was slower
    everywhere (up to 1.3x). The pick was within 5% of the best of 72 swept configs on every
    M1 / M2 shape at M = 1, 8, 16 (H200; the H100, with less bandwidth, is not measured yet).
    M does not enter: the x tile is padded to 16 rows whatever M is.
    ``max_smem`` (bytes per block) lowers num_stages on GPUs with less shared memory; ``gated``
    (skinny_silu_linear, K = I) counts the two x tiles (gate and up) each stage keeps there.
    """
    for name, v in (("M", M), ("N", N), ("K", K), ("num_sms", num_sms), ("elem_bytes", elem_bytes)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    n_cap = max(16, _next_pow2(N))
    k_cap = max(16, _next_pow2(K))
    may_split = N * K * elem_bytes >= (16 << 20)
    best = None
    for bn, row_bytes in ((128, 256), (64, 256), (32, 512)):
        bn = min(bn, n_cap)
        bk = max(16, min(row_bytes // elem_bytes, k_cap))
        tiles = -(-N // bn)
        split = 1
        while True:
            # key: distance of the program count from one per SM, then wider tiles, fewer splits
            key = (round(abs(math.log(tiles * split / num_sms)), 3), -bn, split)
            if best is None or key < best[0]:
                best = (key, bn, bk, split)
            split *= 2
            if not may_split or K // split < 8 * bk or split > 16:
                break
    _, bn, bk, split = best
    stages = 4
    if max_smem is not None:  # Triton keeps (stages - 1) W and x tiles in shared memory
        stage_bytes = (bn + (32 if gated else 16)) * bk * elem_bytes
        stages = max(2, min(stages, 1 + max_smem // stage_bytes))
    return SkinnyConfig(block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=stages)


# ----------------------------------------------------------------------------------------------
# validation (shared by the Triton and torch versions)
# ----------------------------------------------------------------------------------------------
def _check(x, weight, bias, gated: bool = False) -> None:
    """Shapes, dtypes, devices; ``gated``: x is gate_up [M, 2K] (gate | up) for weight [N, K]."""
    xn = "gate_up" if gated else "x"
    for name, t in ((xn, x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    cols = "2I" if gated else "K"
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"{xn} must be [M, {cols}] with 1 <= M <= {MAX_ROWS}, got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, {cols[-1]}], got shape {tuple(weight.shape)}")
    if gated and x.shape[1] != 2 * weight.shape[1]:  # odd widths included
        raise ValueError(f"gate_up must be [M, 2I] (gate | up) for weight [N, I], got gate_up "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    if not gated and weight.shape[1] != x.shape[1]:
        raise ValueError(f"K differs: x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if x.shape[1] == 0 or weight.shape[0] == 0:
        raise ValueError(f"{cols[-1]} and N must be positive, got {xn} {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{xn} dtype {x.dtype} not supported (expected one of {_DTYPES})")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"dtypes differ: {xn} {x.dtype}, weight {weight.dtype}, bias "
                        f"{None if bias is None else bias.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [N={weight.shape[0]}], got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, {xn} on {x.device}")


def skinny_linear_torch(x: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: x [M, K] @ weight [N, K]^T (+ bias [N]) in fp32, returned in x's dtype."""
    _check(x, weight, bias)
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def skinny_silu_linear_torch(gate_up: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: (silu(gate) * up) @ weight [N, I]^T (+ bias) for gate_up [M, 2I] = gate | up;
    the product in fp32 rounded once to gate_up's dtype, then the GEMM in fp32."""
    _check(gate_up, weight, bias, gated=True)
    gate, up = gate_up.float().split(weight.shape[1], dim=1)
    h = (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)
    return skinny_linear_torch(h, weight, bias)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _load_w(w_ptrs, offs_k, K, EVEN_K: tl.constexpr):
        if EVEN_K:
            return tl.load(w_ptrs)
        return tl.load(w_ptrs, mask=offs_k[None, :] < K, other=0.0)

    @triton.jit
    def _layout_fence(x):
        """x, through a no-op that has side effects as far as the compiler knows: it stays where it
        is, so the layout conversion that follows it does too."""
        if x.dtype.primitive_bitwidth == 16:
            return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype,
                                             is_pure=False, pack=2)
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype,
                                         is_pure=False, pack=1)

    @triton.jit
    def _load_x(x_ptrs, offs_k, m_mask, K, stride_xk, EVEN_K: tl.constexpr, GATED: tl.constexpr,
                FENCE: tl.constexpr):
        mask = m_mask
        if not EVEN_K:
            mask = mask & (offs_k[None, :] < K)
        x = tl.load(x_ptrs, mask=mask, other=0.0)
        if GATED:  # x is gate | up: silu(gate) * up in fp32, one rounding (masked: silu(0) * 0 = 0)
            up = tl.load(x_ptrs + K * stride_xk, mask=mask, other=0.0).to(tl.float32)
            gate = x.to(tl.float32)
            x = (gate * tl.sigmoid(gate) * up).to(x.dtype)
            if FENCE:
                # Left alone, Triton moves the conversion to the dot operand's layout up to the
                # loads and computes silu in that layout, where every warp holds the whole x tile:
                # 4x the math and about twice the plain GEMM's time (seen on an H200). Computed
                # in the load's layout and converted after, it is close to the plain GEMM again.
                x = _layout_fence(x)
        return x

    @triton.jit
    def _tile_dot(acc, x, w, PREC: tl.constexpr, DOT_F32: tl.constexpr):
        if DOT_F32:  # the Triton interpreter's bf16 dot is broken: upcast there only
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        return tl.dot(x, tl.trans(w), acc, input_precision=PREC)

    # M only enters masks: not specialising on it (M == 1 would be) saves a compile per M.
    @triton.jit(do_not_specialize=["M"])
    def _skinny_kernel(X, W, BIAS, Y, P, ARRIVALS, M, N, K, k_per_split, k_iters,
                       stride_xm, stride_xk, stride_wn, stride_b, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                       PREC: tl.constexpr, DOT_F32: tl.constexpr, SUM_HERE: tl.constexpr,
                       PDL: tl.constexpr, GATED: tl.constexpr, FENCE: tl.constexpr):
        # GATED: X is gate_up [M, 2K]; the x tile is silu(gate) * up (see _load_x). FENCE: inline
        # PTX allowed (not under the interpreter)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * k_per_split + tl.arange(0, BLOCK_K)
        # Rows past N re-read row N-1 instead of being masked, so W loads carry no mask along N
        # (they stay plain vector loads); their columns are dropped at the store.
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = W + rows[:, None] * stride_wn + offs_k[None, :]
        m_mask = offs_m[:, None] < M          # padded rows of x read as 0 (no memory traffic)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = 0
        if PDL:  # W is a constant: its first tile loads while the kernel before finishes
            w = _load_w(w_ptrs, offs_k, K, EVEN_K)
            tl.extra.cuda.gdc_wait()  # x (and Y, P, ARRIVALS) only after the previous kernel
            x = _load_x(x_ptrs, offs_k, m_mask, K, stride_xk, EVEN_K, GATED, FENCE)
            acc = _tile_dot(acc, x, w, PREC, DOT_F32)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K
            offs_k += BLOCK_K
            first = 1
        for _ in range(first, k_iters):
            w = _load_w(w_ptrs, offs_k, K, EVEN_K)
            x = _load_x(x_ptrs, offs_k, m_mask, K, stride_xk, EVEN_K, GATED, FENCE)
            acc = _tile_dot(acc, x, w, PREC, DOT_F32)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K
            offs_k += BLOCK_K
        if PDL:  # the next kernel may launch now; it waits for this one to finish before reading
            tl.extra.cuda.gdc_launch_dependents()
        n_mask = offs_n[None, :] < N
        if PARTIAL:  # fp32 partial sums of this K slice: P [SPLIT_K, M, N]
            p_ptrs = P + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
            tl.store(p_ptrs, acc, mask=m_mask & n_mask)
            if SUM_HERE:  # the last K slice of this column block to finish sums all of them
                splits = tl.num_programs(1)
                arrived = tl.atomic_add(ARRIVALS + pid_n, 1, sem="acq_rel")  # see paged_attention.py
                if arrived == splits - 1:
                    tl.atomic_xchg(ARRIVALS + pid_n, 0, sem="relaxed")
                    tile = P + offs_m[:, None] * N + offs_n[None, :]
                    total = tl.load(tile, mask=m_mask & n_mask, other=0.0)
                    for s in range(1, splits):  # fixed order: the result is deterministic
                        total += tl.load(tile + s * M * N, mask=m_mask & n_mask, other=0.0)
                    if HAS_BIAS:
                        bias = tl.load(BIAS + offs_n * stride_b, mask=offs_n < N, other=0.0)
                        total += bias.to(tl.float32)[None, :]
                    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :],
                             total.to(Y.dtype.element_ty), mask=m_mask & n_mask)
        else:
            if HAS_BIAS:
                b = tl.load(BIAS + offs_n * stride_b, mask=offs_n < N, other=0.0)
                acc += b.to(tl.float32)[None, :]
            y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
            tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_mask & n_mask)

    @triton.jit(do_not_specialize=["M"])
    def _split_k_reduce_kernel(P, BIAS, Y, M, N, stride_b, stride_ym, SPLIT_K: tl.constexpr,
                               HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.load(P + m * N + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT_K):  # fixed order: the result is deterministic
            acc += tl.load(P + (s * M + m) * N + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs * stride_b, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + m * stride_ym + offs, acc.to(Y.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device) -> tuple[int, Optional[int]]:
    """(SM count, opt-in shared memory per block or None) of a device; cached (no per-call query)."""
    if device.type != "cuda":
        return _num_sms(device), None
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", None)


@functools.lru_cache(maxsize=4096)
def _auto_config(M: int, N: int, K: int, elem_bytes: int, device: torch.device,
                 gated: bool) -> SkinnyConfig:
    num_sms, max_smem = _device_limits(device)
    return choose_config(M, N, K, num_sms, elem_bytes, max_smem, gated)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output/scratch (tests patch this to poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _split_plan(K: int, config: SkinnyConfig) -> tuple[int, int]:
    """(k_per_split, splits): K slices of whole tiles; fewer than config.split_k when K is short,
    so no program gets an empty slice."""
    k_per_split = -(-(-(-K // config.split_k)) // config.block_k) * config.block_k
    return k_per_split, -(-K // k_per_split)


SUM_SPLITS_IN_KERNEL = True  # False: split-K partials summed by a second kernel (benchmarks)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  config: Optional[SkinnyConfig] = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ weight [N, K]^T (+ bias [N]) through the Triton skinny GEMM.

    M <= MAX_ROWS; weight's rows must be K-contiguous (any row stride), x may be strided.
    ``config`` overrides ``choose_config`` (benchmarks). No host sync, shape-only allocation:
    capturable in a CUDA graph. Under torch.compile use torch.ops.sharedecode.skinny_linear.
    """
    _check(x, weight, bias)
    return _launch(x, weight, bias, config, gated=False)


def skinny_silu_linear(gate_up: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor] = None,
                       config: Optional[SkinnyConfig] = None) -> torch.Tensor:
    """y [M, N] = (silu(gate) * up) @ weight [N, I]^T (+ bias [N]) for gate_up [M, 2I] = gate | up,
    through the skinny GEMM (silu(gate) * up formed while loading its x tiles, fp32, rounded once
    to the dtype). As ``skinny_linear`` otherwise, with K = I (``choose_config(M, N, I, ...)``);
    gate_up may be strided. Under torch.compile use torch.ops.sharedecode.skinny_silu_linear."""
    _check(gate_up, weight, bias, gated=True)
    return _launch(gate_up, weight, bias, config, gated=True)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            config: Optional[SkinnyConfig], gated: bool) -> torch.Tensor:
    name = "skinny_silu_linear" if gated else "skinny_linear"
    if not HAS_TRITON:
        raise RuntimeError(f"triton is not installed; use {name}_torch")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{name} runs on CUDA tensors (or under TRITON_INTERPRET=1), "
                         f"got {'gate_up' if gated else 'x'} on {x.device}")
    if weight.stride(1) != 1:
        raise ValueError(f"weight must be contiguous along K (stride(1) == 1), got strides "
                         f"{weight.stride()}")
    M = x.shape[0]
    N, K = weight.shape  # gated: K = I, half of x's columns
    if config is None:
        config = _auto_config(M, N, K, x.element_size(), x.device, gated)
    elif not isinstance(config, SkinnyConfig):
        raise TypeError(f"config must be a SkinnyConfig or None, got {type(config).__name__}")
    config.check()
    k_per_split, splits = _split_plan(K, config)
    y = _alloc((M, N), x.dtype, x.device)
    # Split-K partials go to an fp32 scratch [splits, M, N] rather than to fp32 atomics: no
    # zeroing launch (every partial is written), and a result that does not depend on the order
    # programs finish in (same logits in eager, compiled and graph replays); the scratch is at
    # most 64 x 16 x N x 4 bytes, negligible next to W. The last program of each column block to
    # finish sums the slices in a fixed order (an arrival counter, as paged_attention's split
    # merge), so split-K costs no second launch.
    partial = splits > 1
    sum_here = partial and SUM_SPLITS_IN_KERNEL
    scratch = _alloc((splits, M, N), torch.float32, x.device) if partial else y
    b = bias if bias is not None else y  # placeholder pointer when there is no bias
    column_blocks = -(-N // config.block_n)
    use_pdl = pdl.applies(x.device)
    arrivals = arrival_counters(column_blocks, x.device) if sum_here else y
    _skinny_kernel[(column_blocks, splits)](
        x, weight, b, y, scratch, arrivals, M, N, K, k_per_split, k_per_split // config.block_k,
        x.stride(0), x.stride(1), weight.stride(0), b.stride(0), y.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PARTIAL=partial,
        HAS_BIAS=bias is not None, EVEN_K=splits * k_per_split == K,
        PREC="ieee" if x.dtype == torch.float32 else None, DOT_F32=_dot_f32(x.dtype),
        SUM_HERE=sum_here, PDL=use_pdl, GATED=gated, FENCE=not _interpreting(),
        num_warps=config.num_warps,
        num_stages=config.num_stages, **pdl.launch_options(use_pdl))
    if partial and not sum_here:
        _split_k_reduce_kernel[(M, -(-N // _REDUCE_BLOCK))](
            scratch, b, y, M, N, b.stride(0), y.stride(0), SPLIT_K=splits,
            HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK, num_warps=4)
    return y


# ----------------------------------------------------------------------------------------------
# torch.compile: an opaque op (dynamo does not trace into the launch; the fake gives the shape)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sharedecode::skinny_linear", mutates_args=())
def _skinny_linear_op(x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return skinny_linear(x, weight, bias)


@_skinny_linear_op.register_fake
def _(x, weight, bias=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("sharedecode::skinny_silu_linear", mutates_args=())
def _skinny_silu_linear_op(gate_up: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return skinny_silu_linear(gate_up, weight, bias)


@_skinny_silu_linear_op.register_fake
def _(gate_up, weight, bias=None):
    return gate_up.new_empty((gate_up.shape[0], weight.shape[0]))
