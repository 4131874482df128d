"""Skinny GEMM (kernels/skinny_matmul.py) against cuBLAS at the decode projections of M1 and M2.

For every weight shape [N, K] of the two models and M = 1, 8, 16 rows of bf16 activations:
1. correctness at real size: skinny_linear (heuristic config) and F.linear against an fp32
   reference (x.float() @ W.float().T, TF32 off), relative Frobenius error;
2. timing: one CUDA graph of L calls (L = 16 for M1, 8 for M2: one per layer), each call on its own
   copy of the weight so that no call finds its weight in the 50 MB L2, replayed >= 30 times after
   a warm-up; the figure is the median replay time / L, in microseconds per call. Timed: F.linear
   (cuBLAS), skinny_linear with choose_config, and a small sweep of configs (BLOCK_N x SPLIT_K x
   num_stages), every sweep config checked against the reference first;
3. achieved bandwidth = weight bytes / time, and its fraction of the copy bandwidth (a 2 GiB
   device-to-device copy, eager, bytes read + written, as in bench_kernels.py; measured at the
   start and the end, the larger is used).
Prints one line per case as it goes and a table at the end; writes JSON to --out.

    COMMIT=$(git rev-parse --short HEAD) python bench/bench_skinny_gemm.py --out $OUT/skinny.json
    [--models M1,M2] [--rows 1,8,16] [--sweep small|wide|none]
    TRITON_INTERPRET=1 python bench/bench_skinny_gemm.py --tiny      (CPU smoke test of the script)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

if "--tiny" in sys.argv:  # before triton is imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharedecode.kernels.paged_attention import _num_sms  # noqa: E402
from bench.graph_timing import replay_us  # noqa: E402
from sharedecode.kernels.skinny_matmul import SkinnyConfig, choose_config, skinny_linear  # noqa: E402

# model -> (calls per graph = layers, [(projection, K, N)])
MODELS = {
    "M1": (16, [("qkv", 2048, 3072), ("o_proj", 2048, 2048), ("gate_up", 2048, 16384),
                ("down_proj", 8192, 2048), ("lm_head", 2048, 32000)]),
    "M2": (8, [("qkv", 4096, 6144), ("o_proj", 4096, 4096), ("gate_up", 4096, 28672),
               ("down_proj", 14336, 4096), ("lm_head", 4096, 128256)]),
}
TINY = {"T": (2, [("a", 200, 48), ("b", 96, 70)])}
DTYPE = torch.bfloat16
ERR_BOUND = 1e-2  # bf16 output rounding is ~3e-3 relative; above this a config is marked bad


def _cfg(bn: int, split: int, stages: int = 4, warps: int = 4) -> SkinnyConfig:
    # 256 bytes of each W row per tile at BLOCK_N >= 64, 512 at 32 (tiles of 16-32 KB)
    return SkinnyConfig(block_n=bn, block_k=128 if bn >= 64 else 256, split_k=split, num_warps=warps,
                        num_stages=stages)


def sweep_configs(kind: str) -> list[SkinnyConfig]:
    if kind == "none":
        return []
    if kind == "small":  # 16 configs around what choose_config picks
        return ([_cfg(bn, sk) for bn, sk in itertools.product((32, 64, 128), (1, 2, 4, 8))]
                + [_cfg(bn, sk, stages=3) for bn, sk in itertools.product((32, 128), (1, 4))])
    # wide: what choose_config was tuned on (~2 minutes on an H200, mostly compiling)
    grid = itertools.product((16, 32, 64, 128), (128, 256, 512), (1, 2, 4, 8), (4,), (4,))
    extra = itertools.product((16, 32, 64), (256,), (1, 2), (2, 8), (2, 3, 5, 6))
    return [SkinnyConfig(block_n=bn, block_k=bk, split_k=sk, num_warps=w, num_stages=st)
            for bn, bk, sk, w, st in itertools.chain(grid, extra)]


def name_of(cfg: SkinnyConfig) -> str:
    return f"n{cfg.block_n}k{cfg.block_k}s{cfg.split_k}w{cfg.num_warps}p{cfg.num_stages}"


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y.float() - ref).norm() / ref.norm()).item()


def time_per_call(fn: Callable[[], None], calls: int, device: torch.device, repeats: int = 30) -> float:
    """Microseconds per call of fn (which makes `calls` calls): median CUDA-graph replay / calls.
    On the CPU (--tiny) the median wall time of eager runs."""
    if device.type != "cuda":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6 / calls
    return replay_us(fn, repeats=repeats, warm=2) / calls


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of a device-to-device copy of nbytes, counting bytes read + written: eager copies timed
    with events, as in bench_kernels.py (a copy captured in a CUDA graph becomes a memcpy node that
    ran ~35% slower on an H200)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    if device.type != "cuda":
        us = time_per_call(lambda: b.copy_(a), 1, device)
    else:
        for _ in range(100):  # ~0.15 s: let an idle GPU clock up
            b.copy_(a)
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            b.copy_(a)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        us = statistics.median(times)
    del a, b
    return 2 * nbytes / us / 1e3


def run_shape(model: str, proj: str, K: int, N: int, calls: int, rows: list[int], sweep: list[SkinnyConfig],
              copy_gbps: float, device: torch.device) -> list[dict]:
    num_sms = _num_sms(device)
    weights = [(torch.randn(N, K, device=device) * K ** -0.5).to(DTYPE) for _ in range(calls)]
    wbytes = N * K * weights[0].element_size()
    results = []
    for M in rows:
        x = torch.randn(M, K, device=device).to(DTYPE)
        ref = x.float() @ weights[0].float().t()
        row: dict = {"model": model, "proj": proj, "M": M, "K": K, "N": N, "weight_bytes": wbytes}

        def record(key: str, fn: Callable[[torch.Tensor], torch.Tensor], err: Optional[float] = None) -> None:
            if err is None:
                err = rel(fn(weights[0]), ref)
            entry = {"err": err}
            if not err <= ERR_BOUND:  # also catches NaN
                entry["bad"] = True
            else:
                us = time_per_call(lambda: [fn(w) for w in weights], calls, device)
                entry.update(us=round(us, 2), GBps=round(wbytes / us / 1e3, 1),
                             frac_copy=round(wbytes / us / 1e3 / copy_gbps, 3))
            row[key] = entry

        record("cublas", lambda w: F.linear(x, w))
        heur = choose_config(M, N, K, num_sms, x.element_size())
        row["heuristic_config"] = name_of(heur)
        record("skinny", lambda w: skinny_linear(x, w))
        sweep_res = {}
        for cfg in sweep:
            key = name_of(cfg)
            try:
                record("_tmp", lambda w, cfg=cfg: skinny_linear(x, w, config=cfg))
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skip the config
                row["_tmp"] = {"error": repr(e)[:200], "bad": True}
            sweep_res[key] = row.pop("_tmp")
        row["sweep"] = sweep_res
        timed = {k: v["us"] for k, v in sweep_res.items() if "us" in v}
        if "us" in row["skinny"]:
            timed.setdefault(row["heuristic_config"], row["skinny"]["us"])
        if timed:
            best = min(timed, key=timed.get)
            row["best_config"], row["best_us"] = best, timed[best]
            row["best_frac_copy"] = round(wbytes / timed[best] / 1e3 / copy_gbps, 3)
        results.append(row)
        print(line(row), flush=True)
        del x, ref
    del weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def fmt_us(entry: dict) -> str:
    return f"{entry['us']:8.2f}" if "us" in entry else "     bad"


def line(r: dict) -> str:
    c, s = r["cublas"], r["skinny"]
    frac = lambda e: f"{e['frac_copy'] * 100:5.1f}%" if "us" in e else "   - "  # noqa: E731
    speedup = f"{c['us'] / s['us']:5.2f}x" if "us" in c and "us" in s else "  -  "
    best = (f"{r.get('best_config', '-'):>14} {r.get('best_us', float('nan')):8.2f} "
            f"{r.get('best_frac_copy', float('nan')) * 100:5.1f}%")
    return (f"| {r['model']} {r['proj']:>9} | {r['K']:5d} | {r['N']:6d} | {r['M']:2d} | {fmt_us(c)} {frac(c)} "
            f"| {fmt_us(s)} {frac(s)} {speedup} | {r['heuristic_config']:>14} | {best} "
            f"| {s['err']:.1e} / {c['err']:.1e} |")


HEADER = ("| model proj      |     K |      N |  M | cuBLAS us  %copy | skinny us  %copy  speedup "
          "|  heuristic cfg |       best cfg  best us  %copy | err skinny / cuBLAS |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="skinny_gemm.json")
    parser.add_argument("--models", default="M1,M2")
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--sweep", choices=("small", "wide", "none"), default="small")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (interpreter)")
    args = parser.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    device = torch.device("cpu" if args.tiny else "cuda")
    models = TINY if args.tiny else {m: MODELS[m] for m in args.models.split(",")}
    rows = [int(m) for m in args.rows.split(",")]
    sweep = sweep_configs(args.sweep)
    if args.tiny:
        sweep = [SkinnyConfig(block_n=16, block_k=32, split_k=s) for s in (1, 3)]
    import triton

    report = {"card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "sms": _num_sms(device), "torch": torch.__version__, "triton": triton.__version__,
              "commit": os.environ.get("COMMIT", "unknown"), "dtype": str(DTYPE),
              "sweep": [name_of(c) for c in sweep], "cases": []}
    nbytes = (64 << 20) if args.tiny else (2 << 30)
    report["copy_GBps"] = copy_gbps = copy_bandwidth(device, nbytes)
    print(f"{report['card']} ({report['sms']} SMs), torch {torch.__version__}, triton "
          f"{triton.__version__}; copy bandwidth {copy_gbps:.0f} GB/s (read + write)", flush=True)
    print(HEADER, flush=True)
    for model, (calls, shapes) in models.items():
        for proj, K, N in shapes:
            report["cases"] += run_shape(model, proj, K, N, calls, rows, sweep, copy_gbps, device)
            Path(args.out).write_text(json.dumps(report, indent=1))
    # Measured again with the GPU warm; the larger figure is the reference of the final table.
    report["copy_GBps_start"] = copy_gbps
    copy_gbps = report["copy_GBps"] = max(copy_gbps, copy_bandwidth(device, nbytes))
    for r in report["cases"]:
        for entry in (r["cublas"], r["skinny"], *r["sweep"].values()):
            if "us" in entry:
                entry["frac_copy"] = round(r["weight_bytes"] / entry["us"] / 1e3 / copy_gbps, 3)
        if "best_us" in r:
            r["best_frac_copy"] = round(r["weight_bytes"] / r["best_us"] / 1e3 / copy_gbps, 3)
    report["seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(report, indent=1))
    bad = [(r["model"], r["proj"], r["M"], k) for r in report["cases"]
           for k, v in [("cublas", r["cublas"]), ("skinny", r["skinny"]), *r["sweep"].items()] if v.get("bad")]
    print(f"\ncopy bandwidth {copy_gbps:.0f} GB/s (max of start and end); times are us per call "
          "(CUDA-graph replay of L calls, each on its own weight); %copy = weight bytes / time / copy "
          "bandwidth; speedup = cuBLAS us / skinny us")
    print(HEADER)
    for r in report["cases"]:
        print(line(r))
    print(f"configs over the error bound or failing: {bad or 'none'}")
    print(f"total {report['seconds']} s; JSON in {args.out}")


if __name__ == "__main__":
    main()
