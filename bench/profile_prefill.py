"""The prefill eager, eager with the captured step's swaps, and compiled (bench/NOTES.md, items 37-38).

With the swaps (fused projections, the rotary in `rope_write_kv`), W-shared 256's 4,096-token
chunks got faster, but W-beam's and W-sample's prefills slower: those timed runs reused the
prompt cached by the run before (fixed since), so only their last block went through the swaps.
For each prompt length and setting this times `engine.prefill` of one fresh prompt (warm,
median of `--repeats`): wall time, the time the host takes to return (launches queued), device time
between CUDA events, and the top device kernels and host ops of one profiled prefill.

    COMMIT=<sha> python bench/profile_prefill.py --out $OUT/profile-prefill.json [--lengths 512 4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_e2e import HI  # noqa: E402
from bench.diagnostics import setup  # noqa: E402


def one_prefill(engine, length: int, seed: int) -> tuple[float, float, float]:
    """(wall ms, host ms until prefill returned, device ms between events) for a fresh prompt."""
    prompt = torch.randint(3, HI, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    engine.reset_prefix_cache()  # an earlier row's prompts must not be reused
    table = engine.add(prompt)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start.record()
    engine.prefill([table])
    end.record()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    engine.free(table)
    return wall * 1e3, host * 1e3, start.elapsed_time(end)


def top(events, key: str, count: int = 12) -> list[tuple[str, float, int]]:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:count]
    return [(e.key[:90], round(getattr(e, key) / 1e3, 3), e.count) for e in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="profile_prefill.json")
    parser.add_argument("--model", default="M1")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    engine, report = setup(args.model)
    report["rows"] = []
    compiled = engine.graphs.compiled_prefill
    settings = {"eager": (None, None), "eager, swaps": (None, 0), "compiled": (compiled, 0)}
    for length in args.lengths:
        for setting, (compiled_prefill, swap_from) in settings.items():
            engine.graphs.compiled_prefill = compiled_prefill
            engine.swap_from_tokens = swap_from
            for seed in range(3):  # warm: compiles, cuBLAS choices
                one_prefill(engine, length, seed)
            runs = [one_prefill(engine, length, 100 + i) for i in range(args.repeats)]
            row = {"length": length, "setting": setting,
                   "wall_ms": statistics.median(r[0] for r in runs),
                   "host_ms": statistics.median(r[1] for r in runs),
                   "device_ms": statistics.median(r[2] for r in runs),
                   "compiled_ran": engine.graphs.compiled_prefill is not None}  # (False: it failed)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                one_prefill(engine, length, 999)
            events = prof.key_averages()
            row["top_device_ms"] = top(events, "self_device_time_total")
            row["top_host_ms"] = top(events, "self_cpu_time_total")
            report["rows"].append(row)
            print(f"prefill {length:5d} tokens, {setting:12s}: wall {row['wall_ms']:.2f} ms, "
                  f"host {row['host_ms']:.2f} ms, device {row['device_ms']:.2f} ms", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
