"""Which compilations happen in a workload's later runs (runs after the first should compile
nothing): each run timed on a fresh prefix cache, with dynamo's recompile and graph-break logs on.

    COMMIT=<sha> TORCH_LOGS=recompiles,graph_breaks python bench/recompiles.py --only "W-shared 256" --runs 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.diagnostics import setup, workloads  # noqa: E402

NAMES = ["W-shared 256", "W-beam-batch 16x8", "W-beam k=8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None)
    parser.add_argument("--names", default=",".join(NAMES), help="workloads in this order, comma-separated")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    engine, report = setup("M1")
    print(report, flush=True)
    for name, prompts, strategy in workloads(engine, args.names.split(","), args.only):
        for run in range(args.runs):
            engine.reset_prefix_cache()
            torch.cuda.synchronize()
            start = time.perf_counter()
            strategy.run(prompts if len(prompts) > 1 else prompts[0])
            torch.cuda.synchronize()
            keys = sorted(engine.graphs.graphs) if engine.graphs is not None else []
            print(f"== {name} run {run}: {time.perf_counter() - start:.3f} s, {len(keys)} decode graphs, "
                  f"compiled prefill {'on' if engine.graphs.compiled_prefill is not None else 'OFF'}",
                  flush=True)


if __name__ == "__main__":
    main()
