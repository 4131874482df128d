"""Where a step's time goes on the GPU: host work against device work (issue 7: profile first).

For model M1 (or --model M2): the captured decode step at batch 8 and 64 split into the engine's
host work before the replay, the replay on the device (CUDA events) and the rest; the kernels of
one replayed step (torch profiler, sorted by device time); then one run of W-sample 64, W-shared 256
and W-beam-batch under the profiler: wall time, device-busy time, and the top host and device ops.

    COMMIT=<sha> python bench/profile_gpu.py --out $OUT/profile.json [--model M1] [--only W-shared]
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
from bench.diagnostics import setup, workloads  # noqa: E402
from sharedecode import Engine  # noqa: E402


def decode_breakdown(engine: Engine, batch: int, context: int, steps: int = 30) -> dict:
    """Per step: engine host work before the replay, the replay's device time, total wall time."""
    gen = torch.Generator().manual_seed(batch)
    tables = [engine.add(torch.randint(3, HI, (context,), generator=gen).tolist()) for _ in range(batch)]
    graphs = engine.graphs
    marks: dict[str, float] = {}
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    original_stage = graphs.stage
    wrapped: set[int] = set()

    def timed_stage(*args, **kwargs):  # splits the step at the replay without changing what it does
        key = original_stage(*args, **kwargs)
        marks["host_ready"] = time.perf_counter()
        marks["key"] = key
        if key not in graphs.graphs:
            graphs._capture(key)
        graph, _ = graphs.graphs[key]
        if id(graph) not in wrapped:
            replay = graph.replay

            def recorded(replay=replay):
                start_event.record()
                replay()
                end_event.record()

            graph.replay = recorded
            wrapped.add(id(graph))
        return key

    graphs.stage = timed_stage
    rows = {"host_ms": [], "replay_device_ms": [], "step_ms": []}
    try:
        engine.prefill(tables)
        for i in range(steps + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.decode(tables, [5] * batch)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            if i >= 3:
                rows["host_ms"].append((marks["host_ready"] - t0) * 1e3)
                rows["replay_device_ms"].append(start_event.elapsed_time(end_event))
                rows["step_ms"].append((t1 - t0) * 1e3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                engine.decode(tables, [5] * batch)
            torch.cuda.synchronize()
        kernels = [(e.key, e.device_time_total / 5, e.count // 5) for e in prof.key_averages()
                   if e.device_time_total > 0]
        kernels.sort(key=lambda k: -k[1])
    finally:
        del graphs.stage
        for t in tables:
            engine.free(t)
    out = {k: statistics.median(v) for k, v in rows.items()}
    out["batch"] = batch
    out["graph_key"] = str(marks.get("key"))
    out["kernels_us_per_step"] = [(name[:90], round(us, 2), count) for name, us, count in kernels[:40]]
    out["kernel_sum_us"] = sum(us for _, us, _ in kernels)
    return out


def profile_workload(name: str, engine: Engine, prompts, strategy) -> dict:
    strategy.run(prompts if len(prompts) > 1 else prompts[0])  # warm
    torch.cuda.synchronize()
    engine.reset_prefix_cache()  # every prompt computed, as in bench_e2e's timed runs
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        strategy.run(prompts if len(prompts) > 1 else prompts[0])
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_total = sum(e.self_device_time_total for e in events) / 1e3
    top_device = sorted(events, key=lambda e: -e.self_device_time_total)[:40]
    top_host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
    engine.reset_prefix_cache()
    t1 = time.perf_counter()
    strategy.run(prompts if len(prompts) > 1 else prompts[0])
    torch.cuda.synchronize()
    return {
        "workload": name, "profiled_wall_s": wall, "unprofiled_wall_s": time.perf_counter() - t1,
        "device_busy_ms": device_total,
        "top_device_ms": [(e.key[:90], round(e.self_device_time_total / 1e3, 2), e.count) for e in top_device],
        "top_host_ms": [(e.key[:90], round(e.self_cpu_time_total / 1e3, 2), e.count) for e in top_host],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="profile_gpu.json")
    parser.add_argument("--model", default="M1")
    parser.add_argument("--only", default=None)
    parser.add_argument("--skip-decode", action="store_true", help="only the workloads' profiles")
    args = parser.parse_args()
    engine, report = setup(args.model)
    report.update(decode=[], workloads=[])
    for batch in () if args.skip_decode else (8, 64):
        row = decode_breakdown(engine, batch, 512)
        report["decode"].append(row)
        print(json.dumps(row, indent=1), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    names = ["W-sample n=64", "W-shared 256", "W-beam k=8", "W-beam-batch 16x8"]
    for name, prompts, strategy in workloads(engine, names, args.only):
        row = profile_workload(name, engine, prompts, strategy)
        report["workloads"].append(row)
        print(json.dumps(row, indent=1), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))

if __name__ == "__main__":
    main()
