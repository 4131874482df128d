"""W-kernel (benchmarks.md): paged decode attention alone, on one GPU.

    pip install --no-deps --no-build-isolation -e . && python bench/bench_kernels.py [--quick]

1. correctness at real sizes against the torch reference (prefill, chunked, decode, split-KV,
   shared prefix, CUDA-graph replay);
2. copy bandwidth (large device-to-device copy, bytes read + written);
3. plain paged decode, batch 1..256 x context 512..32k, 32 q / 8 KV heads, head_dim 128, bf16:
   achieved bandwidth (KV bytes that must be read / median time) against the copy bandwidth, a few
   kernel configs, and torch SDPA on the same KV laid out contiguously;
4. shared-prefix decode: 64 sequences sharing 4,096 prefix tokens + 128 own each, against plain
   paged decode.
Writes JSON to $OUT/kernels.json (or bench/results/) and prints a table last.
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
    # shared prefix
    pre = tables(1, 4096, nb, gen)[0]
    own = tables(16, 300, nb, gen)
    bt = torch.cat([pre.expand(16, -1), own], 1)
    ctx = torch.randint(4096 + 1, 4096 + 300, (16,), device=DEV, generator=gen).int()
    qd = torch.randn(16, HQ, D, device=DEV, dtype=DT)
    qsl = torch.arange(17, dtype=torch.int32, device=DEV)
    ref = paged_attention_torch(qd, k, v, bt, ctx, qsl, scale=SCALE)
    out["shared_prefix"] = rel(shared_prefix_decode(qd, k, v, bt, ctx, scale=SCALE), ref)
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
def decode(copy_gbps, quick=False):
    sizes = [(1, 512), (1, 4096), (1, 32768), (8, 4096), (8, 32768), (32, 512), (32, 4096),
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
        del kc, vc
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
              f"{row['triton_best_ms']*1e3:8.1f}us sdpa {row['sdpa_best_ms']*1e3:8.1f}us", flush=True)
    del k, v
    torch.cuda.empty_cache()
    return rows


@section("shared_prefix")
def shared(copy_gbps):
    gen = torch.Generator(device=DEV).manual_seed(2)
    n, prefix, own = 64, 4096, 128
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
    ref = paged_attention_torch(q, k, v, bt, cl, qsl, scale=SCALE)
    res = {"n": n, "prefix": prefix, "own": own, "find_groups_host_ms": groups_ms}
    res["plain_ms"] = med(lambda: paged_attention(q, k, v, bt, cl, qsl, scale=SCALE,
                                                  max_context_len=prefix + own))
    res["plain_graph_ms"] = med_graph(lambda: paged_attention(q, k, v, bt, cl, qsl, scale=SCALE,
                                                              max_context_len=prefix + own))
    for mpc in (8, 16, 32):
        g = find_prefix_groups(bt, cl, BS, members_per_chunk=mpc)
        o = shared_prefix_decode(q, k, v, bt, cl, scale=SCALE, groups=g)
        res[f"shared_mpc{mpc}_err"] = rel(o, ref)
        res[f"shared_mpc{mpc}_ms"] = med(lambda: shared_prefix_decode(q, k, v, bt, cl, scale=SCALE, groups=g))
        res[f"shared_mpc{mpc}_graph_ms"] = med_graph(
            lambda: shared_prefix_decode(q, k, v, bt, cl, scale=SCALE, groups=g))
    best = min((res[f"shared_mpc{m}_ms"], m) for m in (8, 16, 32))
    res["shared_best_ms"], res["shared_best_mpc"] = best
    res["speedup_vs_plain"] = res["plain_ms"] / best[0]
    distinct = (prefix + n * own) * HKV * D * 2 * 2
    logical = n * (prefix + own) * HKV * D * 2 * 2
    res["distinct_kv_bytes"] = distinct
    res["logical_kv_bytes"] = logical
    res["shared_GBps_distinct"] = distinct / best[0] / 1e6
    res["plain_GBps_logical"] = logical / res["plain_ms"] / 1e6
    print(f"  plain {res['plain_ms']*1e3:.1f}us shared {best[0]*1e3:.1f}us (mpc {best[1]}) "
          f"speedup {res['speedup_vs_plain']:.2f}x", flush=True)
    return res


def main():
    quick = "--quick" in sys.argv
    props = torch.cuda.get_device_properties(DEV)
    RES.update(card=props.name, sms=props.multi_processor_count, torch=torch.__version__,
               triton=triton.__version__, date=datetime.date.today().isoformat(),
               shapes={"Hq": HQ, "Hkv": HKV, "head_dim": D, "block_size": BS, "dtype": str(DT)})
    print(RES["card"], RES["torch"], RES["triton"], flush=True)
    correctness()
    copy_bw()
    copy_gbps = RES["sections"].get("copy_bandwidth", {}).get("GBps", 3000.0)
    decode(copy_gbps, quick=quick)
    shared(copy_gbps)
    RES["flex_attention"] = "skipped: not set up in the time given (see bench/NOTES-kernels.md)"
    RES["total_s"] = time.time() - T_START
    outdir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, "kernels.json")
    with open(path, "w") as f:
        json.dump(RES, f, indent=1)
    print("\nwrote", path)
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    print("| batch | ctx | triton auto us | %copy | best cfg | best us | %copy | SDPA us | speedup vs SDPA |")
    for r in RES["sections"].get("decode", []):
        print(f"| {r['batch']} | {r['ctx']} | {r['triton_auto_ms']*1e3:.1f} | "
              f"{r['triton_auto_frac_copy']*100:.1f} | {r['triton_best']} | "
              f"{r['triton_best_ms']*1e3:.1f} | {r['triton_best_frac_copy']*100:.1f} | "
              f"{r['sdpa_best_ms']*1e3:.1f} | {r['sdpa_best_ms']/r['triton_auto_ms']:.2f} |")
    print("errors:", len(RES["errors"]))
    for e in RES["errors"]:
        print(e[:600])
    print(f"total {RES['total_s']:.0f}s")


if __name__ == "__main__":
    main()
