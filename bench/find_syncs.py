"""Which host lines wait for the GPU, and where the host's time goes, per workload (issue 7).

For each workload (warm first): one run under `torch.cuda.set_sync_debug_mode("warn")`, listing
every distinct call stack that synchronised the host with the device (a step should have exactly
one: the transfer of the strategies' results); then one run under cProfile, whose top functions by
own time show the host work (a function that waits for the device shows that wait as its own time).

    python bench/find_syncs.py --out $OUT/syncs.json [--model M1] [--only W-beam]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.diagnostics import setup, workloads  # noqa: E402


def sync_sites(run) -> list[tuple[str, int]]:
    """Distinct stacks (our frames only) of the synchronising calls of one `run()`, with counts."""
    sites: Counter[str] = Counter()
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "sharedecode" in f.filename and "warnings" not in f.filename]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-6:]))] += 1

    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
                torch.cuda.synchronize()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        warnings.showwarning = original
    return sites.most_common(20)


def host_profile(run, top: int = 35) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="syncs.json")
    parser.add_argument("--model", default="M1")
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    engine, report = setup(args.model)
    report["workloads"] = []
    for name, prompts, strategy in workloads(engine, ["W-beam k=8", "W-sample n=64", "W-shared 256"], args.only):

        def run():
            engine.reset_prefix_cache()  # every prompt computed, as in bench_e2e's timed runs
            strategy.run(prompts if len(prompts) > 1 else prompts[0])

        run()  # warm: captures and compilation
        row = {"workload": name, "sync_sites": sync_sites(run), "cprofile": host_profile(run)}
        report["workloads"].append(row)
        print(f"== {name}: synchronising call sites (count per run)", flush=True)
        for site, count in row["sync_sites"]:
            print(f"  {count:5d}  {site}")
        print(row["cprofile"][:6000], flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
