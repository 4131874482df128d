"""The host's Python hot spots of whole workloads on the GPU (cProfile), for what the step
timelines call GPU idle time: the host work between one step's results and the next launch.

    COMMIT=<sha> python bench/cprofile_workload.py --out $OUT/cprofile.json [--only W-beam]

Each workload runs twice to warm (captures, compiles, the prefix cache), then once under cProfile;
the top functions by own time and by cumulative time are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.diagnostics import setup, workloads  # noqa: E402

NAMES = ["W-beam k=8", "W-sample n=64", "W-shared 256", "W-beam-batch 16x8"]


def top(stats: pstats.Stats, key: str, count: int) -> list[tuple[str, int, float, float]]:
    """(function, calls, own ms, cumulative ms) of the `count` largest by `key`."""
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}({name})"
        rows.append((where, calls, round(own * 1e3, 2), round(cumulative * 1e3, 2)))
    rows.sort(key=lambda r: -(r[2] if key == "own" else r[3]))
    return rows[:count]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="cprofile.json")
    parser.add_argument("--model", default="M1")
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    engine, report = setup(args.model)
    report["workloads"] = []
    for name, prompts, strategy in workloads(engine, NAMES, args.only):
        target = prompts if len(prompts) > 1 else prompts[0]
        for _ in range(2):
            strategy.run(target)
        engine.reset_prefix_cache()  # every prompt computed, as in bench_e2e's timed runs
        torch.cuda.synchronize()
        start = time.perf_counter()
        strategy.run(target)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        engine.reset_prefix_cache()
        profiler = cProfile.Profile()
        profiler.enable()
        strategy.run(target)
        torch.cuda.synchronize()
        profiler.disable()
        stats = pstats.Stats(profiler, stream=io.StringIO())
        row = {"workload": name, "wall_s": wall, "profiled_s": stats.total_tt,  # type: ignore[attr-defined]
               "top_own_ms": top(stats, "own", 30), "top_cumulative_ms": top(stats, "cumulative", 40)}
        report["workloads"].append(row)
        print(f"== {name}: {wall:.3f} s unprofiled, {row['profiled_s']:.3f} s profiled", flush=True)
        for where, calls, own, cumulative in row["top_own_ms"][:20]:
            print(f"   {own:9.2f} ms own {cumulative:9.2f} ms cum {calls:7d}x {where}", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
