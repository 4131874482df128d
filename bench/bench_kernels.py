"""W-kernel (benchmarks.md): paged decode attention alone, on one GPU.

    pip install --no-deps --no-build-isolation -e . && python bench/bench_kernels.py [--quick]
        [--only=correctness,probes,decode,flex,shared]   (flex: decode rows of FLEX_SIZES only)

1. correctness at real sizes against the torch reference (prefill, chunked, decode, split-KV,
   shared prefix, CUDA-graph replay);
2. copy bandwidth (large device-to-device copy, bytes read + written);
3. plain paged decode, batch 1..256 x context 512..32k, 32 q / 8 KV heads, head_dim 128, bf16:
   achieved bandwidth (KV bytes that must be read / median time) against the copy bandwidth, a few
   kernel configs, torch SDPA on the same KV laid out contiguously, and FlexAttention reading the
   paged cache through a block mask whose KV blocks are the pages (on a subset of sizes: each
   size is one compile);
4. shared-prefix decode: 64 sequences sharing 4,096 prefix tokens + 128 own each, against plain
   paged decode (and FlexAttention), over a few launch configs.
Every time is the do_bench median (L2 flushed before each run) of eager launches (``*_ms``) and
of CUDA-graph replays (``*_graph_ms``: no host launch overhead). Writes JSON to $OUT/kernels.json
(or bench/results/) and prints tables last.
"""
import datetime
import json
import os
import sys
import time
import traceback

import torch
import triton
from triton.testing import do_bench

from sharedecode.kernels.kv_cache_ops import copy_blocks, copy_blocks_torch, write_kv, write_kv_torch
from sharedecode.kernels.paged_attention import paged_attention, paged_attention_torch
from sharedecode.kernels.shared_prefix import find_prefix_groups, shared_prefix_decode

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = flex_attention = None

DEV = torch.device("cuda")
HQ, HKV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
SCALE = D ** -0.5
RES = {"sections": {}, "errors": []}
T_START = time.time()


def rel(a, b):
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


def med(fn):
    return do_bench(fn, warmup=10, rep=40, return_mode="median")  # ms


def us(ms):
    return "-" if ms is None else f"{ms * 1e3:.1f}"


def med_graph(fn):
    """Median time of a CUDA-graph replay of fn (no host launch overhead); None if capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        return do_bench(g.replay, warmup=10, rep=40, return_mode="median")
    except Exception as e:  # noqa: BLE001
        RES["errors"].append(f"graph capture: {e!r}")
        return None


def section(name):
    def deco(f):
        def run(*a, **k):
            t0 = time.time()
            try:
                RES["sections"][name] = f(*a, **k)
            except Exception as e:  # keep going: one broken section must not lose the others
                RES["errors"].append(f"{name}: {e!r}\n{traceback.format_exc()[-1500:]}")
                print("ERROR in", name, repr(e), flush=True)
            print(f"[{name}] {time.time() - t0:.1f}s", flush=True)
        return run
    return deco


def make_pool(num_tokens):
    nb = -(-num_tokens // BS) + 8
    k = torch.randn(nb, BS, HKV, D, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    return k, v


def tables(batch, ctx, nb, gen):
    need = -(-ctx // BS)
    perm = torch.randperm(nb, device=DEV, generator=gen)[: batch * need]
    return perm.view(batch, need).int()


_FLEX = {}
FLEX_SIZES = {(1, 4096), (8, 4096), (32, 4096), (128, 4096), (32, 16384), (256, 4096)}
FLEX_BUDGET_S = 150.0  # compile time allowed for FlexAttention over the whole run


def flex_block_mask(bt, cl, num_pages):
    """BlockMask over the physical cache seen as one sequence of num_pages * BS keys, whose KV
    blocks are the pages (BLOCK_SIZE[1] = BS): each sequence's pages come straight from its block
    table, all but the last marked full (no mask_mod there). mask_mod is the exact mask (page of
    this sequence, logical position < context length) through a physical-to-logical page map,
    so the function is right even where the block structure is not used (eager flex)."""
    b, width = bt.shape
    npages = (cl + BS - 1) // BS
    full = (cl // BS).int()
    partial = (npages - full).int()                                    # 0 or 1
    last = bt.gather(1, (npages - 1).clamp(min=0).long().view(b, 1)).int()
    bt = bt.int()
    j = torch.arange(width, device=bt.device).expand(b, width)
    live = j < npages.view(b, 1)
    p2l = torch.full((b, num_pages), -1, dtype=torch.int32, device=bt.device)
    p2l[torch.arange(b, device=bt.device).view(b, 1).expand(b, width)[live], bt.long()[live]] = \
        j[live].int()

    def mask_mod(bi, h, q_idx, kv_idx):
        page = p2l[bi, kv_idx // BS]
        return (page >= 0) & (page * BS + kv_idx % BS < cl[bi])

    # the compiled kernel wants the index tensors as wide as the KV length in blocks (all pages)
    full_idx = torch.zeros((b, 1, 1, num_pages), dtype=torch.int32, device=bt.device)
    full_idx[:, 0, 0, :width] = bt
    last_idx = torch.zeros_like(full_idx)
    last_idx[:, 0, 0, 0] = last.view(b)
    kw = dict(BLOCK_SIZE=(128, BS), mask_mod=mask_mod, seq_lengths=(1, num_pages * BS))
    args = (partial.view(b, 1, 1), last_idx, full.view(b, 1, 1), full_idx)
    try:
        return BlockMask.from_kv_blocks(*args, compute_q_blocks=False, **kw)
    except TypeError:  # torch without compute_q_blocks
        return BlockMask.from_kv_blocks(*args, **kw)


def flex_paged_fn(q, k, v, bt, cl):
    """FlexAttention decode over the paged cache: query [B, Hq, 1, D]; K/V the pool viewed as
    [1, Hkv, pages * BS, D] (no copy, batch broadcast); returns a callable giving [B, Hq, D]."""
    if flex_attention is None:
        raise RuntimeError("torch has no flex_attention")
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    pages = k.shape[0]
    kp = k.view(1, pages * BS, HKV, D).transpose(1, 2)
    vp = v.view(1, pages * BS, HKV, D).transpose(1, 2)
    bm = flex_block_mask(bt, cl, pages)
    qf = q.view(q.shape[0], HQ, 1, D)
    return lambda: _FLEX["fn"](qf, kp, vp, block_mask=bm, scale=SCALE, enable_gqa=True).view(q.shape)


def compact_pool(k, v, bt):
    """The pages bt uses, copied in a random order into a pool of their own. FlexAttention's
    template (torch 2.11) fails to compile once the pool passed as K has >= 2**31 elements
    (int64 and int32 mixed in a ternary), which the shared 8.6 GB decode pool has."""
    used = bt.flatten().unique()
    used = used[torch.randperm(used.numel(), device=used.device)]
    remap = torch.full((k.shape[0],), -1, dtype=torch.int64, device=bt.device)
    remap[used.long()] = torch.arange(used.numel(), device=bt.device)
    return k[used.long()], v[used.long()], remap[bt.long()].int()


def flex_measure(row, q, k, v, bt, cl, ref, prefix="flex"):
    """Adds flex_ms / flex_graph_ms / flex_err (or flex_note) to row; within FLEX_BUDGET_S."""
    if _FLEX.get("spent", 0.0) > FLEX_BUDGET_S:
        row[f"{prefix}_note"] = "skipped: FlexAttention compile budget used up"
        return
    t0 = time.time()
    try:
        k, v, bt = compact_pool(k, v, bt)
        fn = flex_paged_fn(q, k, v, bt, cl)
        o = fn()
        torch.cuda.synchronize()
        row[f"{prefix}_err"] = rel(o, ref)
        row[f"{prefix}_ms"] = med(fn)
        row[f"{prefix}_graph_ms"] = med_graph(fn)
    except Exception as e:  # noqa: BLE001 - record why and go on
        row[f"{prefix}_note"] = f"failed: {e!r}"[:500]
    _FLEX["spent"] = _FLEX.get("spent", 0.0) + time.time() - t0


@section("correctness")
def correctness():
    out = RES["sections"]["correctness"] = {}  # partial results survive an error
    gen = torch.Generator(device=DEV).manual_seed(0)
    k, v = make_pool(4 * 30000 + 5 * 4200 + 16 * 300 + 4096 + 1024)
    nb = k.shape[0]
    # mixed batch: prefill, chunked prefill, decode (different lengths)
    specs = [(1000, 1000), (300, 2500), (1, 4097), (1, 17), (64, 64)]
    bt = torch.stack([torch.cat([tables(1, 4200, nb, gen)[0]]) for _ in specs])
    ctx = torch.tensor([c for _, c in specs], dtype=torch.int32, device=DEV)
    qsl = torch.tensor([0] + list(torch.tensor([q for q, _ in specs]).cumsum(0)), dtype=torch.int32,
                       device=DEV)
    q = torch.randn(int(qsl[-1]), HQ, D, device=DEV, dtype=DT)
    for kw_name, kw in (("plain", {}), ("window", {"sliding_window": 700}), ("softcap", {"softcap": 30.0})):
        ref = paged_attention_torch(q, k, v, bt, ctx, qsl, scale=SCALE, **kw)
        o = torch.full_like(q, float("nan"))
        paged_attention(q, k, v, bt, ctx, qsl, scale=SCALE, out=o, **kw)
        out[f"mixed_bf16_{kw_name}"] = rel(o, ref)
    for dt in (torch.float16, torch.float32):
        q2, k2, v2 = q.to(dt), k.to(dt), v.to(dt)
        ref = paged_attention_torch(q2.double(), k2.double(), v2.double(), bt, ctx, qsl, scale=SCALE)
        out[f"mixed_{str(dt)[6:]}"] = rel(paged_attention(q2, k2, v2, bt, ctx, qsl, scale=SCALE), ref)
        del k2, v2
    # decode, split-KV forced and auto
    bt = tables(4, 30000, nb, gen)
    ctx = torch.tensor([30000, 9000, 1, 4100], dtype=torch.int32, device=DEV)
    qd = torch.randn(4, HQ, D, device=DEV, dtype=DT)
    qsl = torch.arange(5, dtype=torch.int32, device=DEV)
    ref = paged_attention_torch(qd, k, v, bt, ctx, qsl, scale=SCALE)
    for ns in (None, 1, 7, 32):
        out[f"decode_splits_{ns}"] = rel(paged_attention(qd, k, v, bt, ctx, qsl, scale=SCALE, num_splits=ns), ref)
    # CUDA graph capture + replay of the decode path
    o = torch.full_like(qd, float("nan"))
    paged_attention(qd, k, v, bt, ctx, qsl, scale=SCALE, out=o, max_context_len=30000)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        paged_attention(qd, k, v, bt, ctx, qsl, scale=SCALE, out=o, max_context_len=30000)
    qd.copy_(torch.randn_like(qd))
    o.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    out["decode_cuda_graph"] = rel(o, paged_attention_torch(qd, k, v, bt, ctx, qsl, scale=SCALE))
    # shared prefix: two groups (prefix 4096 and 1024 tokens) and 3 sequences in no group
    pre = tables(1, 4096, nb, gen)[0]
    bt = torch.cat([tables(16, 4096, nb, gen), tables(16, 300, nb, gen)], 1)
    bt[:10, :256] = pre
    bt[10:13, :64] = pre[:64].flip(0)
    ctx = torch.randint(4096 + 1, 4096 + 300, (16,), device=DEV, generator=gen).int()
    qd = torch.randn(16, HQ, D, device=DEV, dtype=DT)
    qsl = torch.arange(17, dtype=torch.int32, device=DEV)
    groups = find_prefix_groups(bt, ctx, BS)
    out["shared_prefix_groups"] = [(len(m), nblk) for m, nblk in groups.groups]
    ref = paged_attention_torch(qd, k, v, bt, ctx, qsl, scale=SCALE)
    for name, cfg in (("default", None), ("separate", {"separate": True}),
                      ("m64", {"prefix_m": 64})):
        o = torch.full_like(qd, float("nan"))
        shared_prefix_decode(qd, k, v, bt, ctx, scale=SCALE, groups=groups, out=o, _config=cfg)
        out[f"shared_prefix_{name}"] = rel(o, ref)
    g = torch.cuda.CUDAGraph()
    o = torch.full_like(qd, float("nan"))
    with torch.cuda.graph(g):
        shared_prefix_decode(qd, k, v, bt, ctx, scale=SCALE, groups=groups, out=o)
    qd.copy_(torch.randn_like(qd))
    o.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    out["shared_prefix_cuda_graph"] = rel(o, paged_attention_torch(qd, k, v, bt, ctx, qsl, scale=SCALE))
    # kv ops
    pool = torch.randn(4, 2, 64, BS, HKV, D, device=DEV, dtype=DT)
    p2 = pool.clone()
    src = torch.tensor([1, 2, 3], device=DEV)
    dst = torch.tensor([10, 20, 30], device=DEV)
    copy_blocks(pool, src, dst)
    copy_blocks_torch(p2, src, dst)
    out["copy_blocks_equal"] = bool(torch.equal(pool, p2))
    kk = torch.randn(100, HKV, D, device=DEV, dtype=DT)
    sl = torch.randperm(64 * BS, device=DEV)[:100]
    sl[::7] = -1
    a, b = pool[0, 0].clone(), pool[0, 1].clone()
    write_kv(kk, kk, pool[0, 0], pool[0, 1], sl)
    write_kv_torch(kk, kk, a, b, sl)
    out["write_kv_equal"] = bool(torch.equal(pool[0, 0], a) and torch.equal(pool[0, 1], b))
    for key, val in out.items():
        print(f"  {key}: {val}")
    return out


@section("copy_bandwidth")
def copy_bw():
    n = 2 * 1024 ** 3  # bytes per buffer
    a = torch.randn(n // 4, device=DEV)
    b = torch.empty_like(a)
    ms = med(lambda: b.copy_(a))
    bw = 2 * n / ms / 1e6  # GB/s (read + write)
    del a, b
    return {"bytes_each_way": n, "ms": ms, "GBps": bw}


CONFIGS = {  # name -> (paged_attention kwargs)
    "auto": {},
    "tile32": {"_config": {"tile_n": 32}},
    "tile128_w8": {"_config": {"tile_n": 128, "num_warps": 8}},
    "tile64_w8_s4": {"_config": {"tile_n": 64, "num_warps": 8, "num_stages": 4}},
}


@section("decode")
def decode(copy_gbps, quick=False, sizes=None):
    sizes = sizes or [(1, 512), (1, 4096), (1, 32768), (8, 4096), (8, 32768), (32, 512), (32, 4096),
             (32, 16384), (64, 4096), (128, 4096), (256, 512), (256, 4096), (256, 16384)]
    if quick:
        sizes = [(1, 4096), (32, 4096), (256, 4096)]
    gen = torch.Generator(device=DEV).manual_seed(1)
    k, v = make_pool(max(b * c for b, c in sizes))
    nb = k.shape[0]
    rows = []
    for batch, ctx in sizes:
        bt = tables(batch, ctx, nb, gen)
        cl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
        q = torch.randn(batch, HQ, D, device=DEV, dtype=DT)
        kv_bytes = batch * ctx * HKV * D * 2 * 2
        row = {"batch": batch, "ctx": ctx, "kv_bytes": kv_bytes}
        o = torch.empty_like(q)
        for name, kw in CONFIGS.items():
            try:
                fn = lambda: paged_attention(q, k, v, bt, cl, qsl, scale=SCALE, out=o,  # noqa: E731
                                             max_context_len=ctx, **kw)
                row[f"triton_{name}_ms"] = med(fn)
            except Exception as e:
                row[f"triton_{name}_ms"] = None
                RES["errors"].append(f"decode {batch}x{ctx} {name}: {e!r}")
        row["triton_auto_graph_ms"] = med_graph(
            lambda: paged_attention(q, k, v, bt, cl, qsl, scale=SCALE, out=o, max_context_len=ctx))
        # torch SDPA on the same KV contiguous: [B, Hkv, ctx, D]
        kc = k[bt.long()].view(batch, -1, HKV, D)[:, :ctx].transpose(1, 2).contiguous()
        vc = v[bt.long()].view(batch, -1, HKV, D)[:, :ctx].transpose(1, 2).contiguous()
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.view(batch, HKV, HQ // HKV, D), kc, vc, scale=SCALE)
        row["err_vs_sdpa"] = rel(o.view(batch, HKV, HQ // HKV, D), ref)
        try:
            qg = q.view(batch, HQ, 1, D)
            row["sdpa_gqa_ms"] = med(lambda: torch.nn.functional.scaled_dot_product_attention(
                qg, kc, vc, scale=SCALE, enable_gqa=True))
        except Exception as e:
            row["sdpa_gqa_ms"] = None
            RES["errors"].append(f"sdpa gqa {batch}x{ctx}: {e!r}")
        row["sdpa_gqa_graph_ms"] = med_graph(lambda: torch.nn.functional.scaled_dot_product_attention(
            q.view(batch, HQ, 1, D), kc, vc, scale=SCALE, enable_gqa=True))
        qf = q.view(batch, HKV, HQ // HKV, D)  # GQA folded into query rows (decode: no causal mask)
        row["sdpa_folded_ms"] = med(lambda: torch.nn.functional.scaled_dot_product_attention(
            qf, kc, vc, scale=SCALE))
        if (batch, ctx) in FLEX_SIZES and not quick or (batch, ctx) == (32, 4096):
            flex_measure(row, q, k, v, bt, cl, ref.reshape(batch, HQ, D))  # err vs SDPA
        del kc, vc, ref
        tri = {n: row[f"triton_{n}_ms"] for n in CONFIGS if row[f"triton_{n}_ms"]}
        best = min(tri, key=tri.get)
        row["triton_best"] = best
        row["triton_best_ms"] = tri[best]
        sd = [x for x in (row["sdpa_gqa_ms"], row["sdpa_folded_ms"]) if x]
        row["sdpa_best_ms"] = min(sd)
        for n in ("auto", "best"):
            ms = row[f"triton_{n}_ms"]
            row[f"triton_{n}_GBps"] = kv_bytes / ms / 1e6
            row[f"triton_{n}_frac_copy"] = kv_bytes / ms / 1e6 / copy_gbps
        row["sdpa_GBps"] = kv_bytes / row["sdpa_best_ms"] / 1e6
        rows.append(row)
        print(f"  B={batch:4d} ctx={ctx:6d} auto {row['triton_auto_ms']*1e3:8.1f}us "
              f"({row['triton_auto_frac_copy']*100:5.1f}% copy) best {best} "
              f"{row['triton_best_ms']*1e3:8.1f}us sdpa {row['sdpa_best_ms']*1e3:8.1f}us "
              f"flex {us(row.get('flex_ms'))} {row.get('flex_note', '')[:80]}", flush=True)
    del k, v
    torch.cuda.empty_cache()
    return rows


def _v(ps=None, ss=None, **cfg):
    return {"prefix_splits": ps, "suffix_splits": ss, "_config": cfg or None}


SHARED_VARIANTS = {  # name -> shared_prefix_decode kwargs; "default" = no overrides
    "default": _v(),
    "m64_s8_pt32": _v(8, prefix_m=64, prefix_tile=32),
    "m64_s4_pt32": _v(4, prefix_m=64, prefix_tile=32),
    "m64_s16_pt32": _v(16, prefix_m=64, prefix_tile=32),
    "m32_s8_pt32": _v(8, prefix_m=32, prefix_tile=32),
    "m64_s8_pt16": _v(8, prefix_m=64, prefix_tile=16),
    "m128_s8_pt32": _v(8, prefix_m=128, prefix_tile=32),
    "m64_s8_pt32_ns2": _v(8, prefix_m=64, prefix_tile=32, num_stages=2),
    "m64_s8_pt32_st32": _v(8, prefix_m=64, prefix_tile=32, suffix_tile=32),
    "m64_s8_pt64": _v(8, prefix_m=64, prefix_tile=64),
    "m128_s8_pt64": _v(8, prefix_m=128, prefix_tile=64),
    "sep_m64_s8_pt32": _v(8, prefix_m=64, prefix_tile=32, separate=True),
}
BREAKDOWN = ("default", "sep_m64_s8_pt32")


class _LaunchFilter:
    """Stands in for a Triton kernel of shared_prefix: launches only the calls whose keyword
    arguments pass ``keep`` (to time parts of a call; the output is then wrong)."""

    def __init__(self, kern, keep):
        self.kern, self.keep = kern, keep

    def __getitem__(self, grid):
        launch = self.kern[grid]
        return lambda *a, **kw: launch(*a, **kw) if self.keep(kw) else None


def time_parts(fn):
    """Graph-replay times of fn with only some of its launches: no merge, prefix programs only,
    own-key programs only (the last two for separate=True), merge only."""
    from sharedecode.kernels import shared_prefix as sp
    kern, merge = sp._cascade_kernel, sp._cascade_merge_kernel
    parts = {"no_merge": (lambda kw: True, False), "prefix_only": (lambda kw: kw["ROLE"] == 1, False),
             "suffix_only": (lambda kw: kw["ROLE"] == 2, False), "merge_only": (lambda kw: False, True)}
    out = {}
    try:
        for name, (keep, keep_merge) in parts.items():
            sp._cascade_kernel = _LaunchFilter(kern, keep)
            sp._cascade_merge_kernel = _LaunchFilter(merge, lambda kw, m=keep_merge: m)
            out[name] = med_graph(fn)
    finally:
        sp._cascade_kernel, sp._cascade_merge_kernel = kern, merge
    return out


def loop_graph(fn, n=50):
    """Mean time of n back-to-back graph replays without flushing L2 in between."""
    try:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / n
    except Exception as e:  # noqa: BLE001
        RES["errors"].append(f"loop_graph: {e!r}")
        return None


@section("probes")
def probes(copy_gbps):
    """Fixed costs of the method: a pure 50 MB read (the shared case's distinct KV bytes), a
    25 MB copy, and one / two tiny kernels, all as do_bench'd graph replays (L2 flushed)."""
    x = torch.randn(25 * 2**20, device=DEV, dtype=DT)   # 50 MB
    acc = torch.empty((), device=DEV, dtype=torch.float32)
    y = torch.empty(x.numel() // 2, device=DEV, dtype=DT)
    tiny = torch.zeros(1, device=DEV)
    read = lambda: torch.sum(x, 0, dtype=torch.float32, out=acc)  # noqa: E731
    res = {"read50MB_ms": med(read), "read50MB_graph_ms": med_graph(read),
           "read50MB_noflush_ms": loop_graph(read),
           "copy25MB_graph_ms": med_graph(lambda: y.copy_(x[:y.numel()])),
           "tiny1_graph_ms": med_graph(lambda: tiny.add_(1)),
           "tiny2_graph_ms": med_graph(lambda: (tiny.add_(1), tiny.add_(1)))}
    res["read50MB_floor_ms"] = 2 * x.numel() / copy_gbps / 1e6
    print("  probes:", {k: us(v) for k, v in res.items()}, flush=True)
    return res


def kernel_resources(jit_fn):
    """n_regs / n_spills / shared bytes of every compiled specialisation (best effort)."""
    out = []
    try:
        for cache in jit_fn.device_caches.values():
            for kern in cache[0].values():
                out.append({"name": kern.metadata.name, "n_regs": kern.n_regs,
                            "n_spills": kern.n_spills, "shared": kern.metadata.shared,
                            "num_warps": kern.metadata.num_warps})
    except Exception as e:  # noqa: BLE001 - triton internals move between versions
        out.append({"error": repr(e)})
    return out


@section("shared_prefix")
def shared(copy_gbps, n=64, prefix=4096, own=128):
    gen = torch.Generator(device=DEV).manual_seed(2)
    k, v = make_pool(prefix + n * own + 64 * 1024)
    nb = k.shape[0]
    pre = tables(1, prefix, nb, gen)[0]
    rest = tables(n, own, nb, gen)
    bt = torch.cat([pre.expand(n, -1), rest], 1).contiguous()
    cl = torch.full((n,), prefix + own, dtype=torch.int32, device=DEV)
    qsl = torch.arange(n + 1, dtype=torch.int32, device=DEV)
    q = torch.randn(n, HQ, D, device=DEV, dtype=DT)
    t0 = time.perf_counter()
    groups = find_prefix_groups(bt, cl, BS)
    groups_ms = (time.perf_counter() - t0) * 1e3
    ref = paged_attention_torch(q, k, v, bt, cl, qsl, scale=SCALE)  # fp32 compute
    res = {"n": n, "prefix": prefix, "own": own, "find_groups_host_ms": groups_ms}
    o = torch.full_like(q, float("nan"))
    plain = lambda: paged_attention(q, k, v, bt, cl, qsl, scale=SCALE, out=o,  # noqa: E731
                                    max_context_len=prefix + own)
    plain()
    res["plain_err"] = rel(o, ref)
    res["plain_ms"] = med(plain)
    res["plain_graph_ms"] = med_graph(plain)
    flex_measure(res, q, k, v, bt, cl, ref)
    res["plain_noflush_ms"] = loop_graph(plain)
    variants = {}
    for name, kw in SHARED_VARIANTS.items():
        r = variants[name] = dict(kw)
        try:
            fn = lambda: shared_prefix_decode(q, k, v, bt, cl, scale=SCALE, groups=groups,  # noqa: E731
                                              out=o, **kw)
            o.fill_(float("nan"))
            fn()
            r["err"] = rel(o, ref)
            r["ms"] = med(fn)
            r["graph_ms"] = med_graph(fn)
            if name in BREAKDOWN:
                r["noflush_ms"] = loop_graph(fn)
                r["parts_graph_ms"] = time_parts(fn)
        except Exception as e:  # noqa: BLE001
            r["note"] = f"failed: {e!r}"[:500]
            RES["errors"].append(f"shared {name}: {e!r}")
        print(f"  shared {name:22s} err {r.get('err', float('nan')):.2e} eager {us(r.get('ms'))}us "
              f"graph {us(r.get('graph_ms'))}us "
              f"{ {p: us(t) for p, t in r.get('parts_graph_ms', {}).items()} }", flush=True)
    res["variants"] = variants
    ok = {m: r.get("graph_ms") or r["ms"] for m, r in variants.items()
          if r.get("ms") and r.get("err", 1) < 1e-2}
    res["best_variant"] = min(ok, key=ok.get) if ok else None
    default = variants["default"]
    res["default_ms"], res["default_graph_ms"] = default.get("ms"), default.get("graph_ms")
    if res["default_ms"]:
        res["speedup_default_eager"] = res["plain_ms"] / res["default_ms"]
    if res["plain_graph_ms"] and res["default_graph_ms"]:
        res["speedup_default_graph"] = res["plain_graph_ms"] / res["default_graph_ms"]
    if res["plain_graph_ms"] and ok:
        res["speedup_best_graph"] = res["plain_graph_ms"] / ok[res["best_variant"]]
    distinct = (prefix + n * own) * HKV * D * 2 * 2
    logical = n * (prefix + own) * HKV * D * 2 * 2
    res["distinct_kv_bytes"] = distinct
    res["logical_kv_bytes"] = logical
    res["floor_ms"] = distinct / copy_gbps / 1e6
    res["plain_GBps_logical"] = logical / res["plain_ms"] / 1e6
    from sharedecode.kernels import shared_prefix as sp
    res["resources"] = kernel_resources(sp._cascade_kernel)
    return res


def main():
    quick = "--quick" in sys.argv
    only = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")), None)
    want = lambda name: only is None or name in only  # noqa: E731
    props = torch.cuda.get_device_properties(DEV)
    RES.update(card=props.name, sms=props.multi_processor_count, torch=torch.__version__,
               triton=triton.__version__, date=datetime.date.today().isoformat(),
               shapes={"Hq": HQ, "Hkv": HKV, "head_dim": D, "block_size": BS, "dtype": str(DT)})
    print(RES["card"], RES["torch"], RES["triton"], flush=True)
    if want("correctness"):
        correctness()
    copy_bw()
    copy_gbps = RES["sections"].get("copy_bandwidth", {}).get("GBps", 3000.0)
    if want("probes"):
        probes(copy_gbps)
    if want("decode"):
        decode(copy_gbps, quick=quick)
    elif want("flex"):
        decode(copy_gbps, sizes=sorted(FLEX_SIZES))
    if want("shared"):
        shared(copy_gbps)
    RES["flex_compile_s"] = _FLEX.get("spent")
    RES["total_s"] = time.time() - T_START
    outdir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, "kernels.json")
    with open(path, "w") as f:
        json.dump(RES, f, indent=1)
    print("\nwrote", path)
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    print("| batch | ctx | triton auto us | graph us | %copy (graph) | best cfg | best us | SDPA us | "
          "SDPA graph us | Flex us | Flex graph us | Flex err |")
    for r in RES["sections"].get("decode", []):
        gms = r.get("triton_auto_graph_ms")
        frac = f"{r['kv_bytes'] / gms / 1e6 / copy_gbps * 100:.1f}" if gms else "-"
        print(f"| {r['batch']} | {r['ctx']} | {us(r['triton_auto_ms'])} | {us(gms)} | {frac} | "
              f"{r['triton_best']} | {us(r['triton_best_ms'])} | {us(r['sdpa_best_ms'])} | "
              f"{us(r.get('sdpa_gqa_graph_ms'))} | {us(r.get('flex_ms'))} | "
              f"{us(r.get('flex_graph_ms'))} | {r.get('flex_err', r.get('flex_note', '-'))} |")
    sh = RES["sections"].get("shared_prefix")
    if sh:
        print(f"shared prefix (64 x 4096 + 128): floor {sh['floor_ms']*1e3:.1f}us; plain eager "
              f"{us(sh['plain_ms'])} graph {us(sh['plain_graph_ms'])}; flex eager "
              f"{us(sh.get('flex_ms'))} graph {us(sh.get('flex_graph_ms'))} {sh.get('flex_note', '')[:100]}")
        print("| variant | err | eager us | graph us | x plain (eager) | x plain (graph) |")
        for name, r in sh["variants"].items():
            xe = f"{sh['plain_ms'] / r['ms']:.2f}" if r.get("ms") else "-"
            xg = (f"{sh['plain_graph_ms'] / r['graph_ms']:.2f}"
                  if r.get("graph_ms") and sh["plain_graph_ms"] else "-")
            print(f"| {name} | {r.get('err', r.get('note', '-'))} | {us(r.get('ms'))} | "
                  f"{us(r.get('graph_ms'))} | {xe} | {xg} |")
        print("resources:", sh.get("resources"))
    if RES["sections"].get("probes"):
        print("probes:", {k: us(v) for k, v in RES["sections"]["probes"].items()})
    print("errors:", len(RES["errors"]))
    for e in RES["errors"]:
        print(e[:600])
    print(f"total {RES['total_s']:.0f}s")


if __name__ == "__main__":
    main()
