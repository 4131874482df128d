"""The host's work per decode step as the GPU path does it, measured on any machine (no GPU).

A tiny Llama with M1's vocabulary runs on the CPU, and the engine takes the CUDA-graph path with
the forward left out: each step stages its inputs exactly as `DecodeGraphs.stage` does for a
replay (host buffers, changed block-table rows, group layout) and returns fixed logits, and the
prefill returns fixed logits too. What is left is the host's bookkeeping (allocator, groups,
staging, the requests' own steps), the part of a step that the GPU waits for when it is longer
than the forward (beam search always; W-shared 256 and W-beam-batch on slower hosts:
bench/NOTES.md, runs of the fifth session). Look-ahead is on, as on CUDA.

Per workload, median of --repeats runs, microseconds per step:
  decode      Engine.decode (or decode_forked, beam search's steps launched ahead) up to the
              replay (allocator, groups, staging)
  finish      Scheduler._finish: reading the results and each request's host step
  host        the two together: the host's share of a step on the critical path (the device-side
              ops that _queue_choice launches run here on the CPU, so they are not counted)

    python bench/host_step.py [--new-tokens 32] [--repeats 3] [--only W-shared]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.profile_host import build_engine  # noqa: E402
from sharedecode.block_allocator import BlockAllocator  # noqa: E402
from sharedecode.cuda_graphs import DecodeGraphs  # noqa: E402
from sharedecode.engine import Engine  # noqa: E402
from sharedecode.scheduler import Scheduler  # noqa: E402
from sharedecode.strategies import BeamSearch, Greedy, ParallelSampling  # noqa: E402
from sharedecode.strategies.sampling import SampleRequest  # noqa: E402

PARTS = {"decode": (Engine, "decode"), "decode_forked": (Engine, "decode_forked"),
         "finish": (Scheduler, "_finish")}
# --detail: the parts of those (each inside one of the above)
DETAIL = {"append_tokens": (BlockAllocator, "append_tokens"),
          "blocks_needed": (BlockAllocator, "blocks_needed_for_step"),
          "mark_computed": (BlockAllocator, "mark_all_computed"),
          "fill_last_tokens": (BlockAllocator, "fill_last_tokens"),
          "groups": (Engine, "_shared_prefix_groups"), "stage": (DecodeGraphs, "stage"),
          "step_host (sampling)": (SampleRequest, "step_host")}


def staged_engine(max_rows: int = 256) -> Engine:
    """A CPU engine whose decode steps are staged for a (never replayed) graph."""
    engine = build_engine()
    engine.shared_prefix = True
    engine.look_ahead = True
    graphs = DecodeGraphs(engine, max_batch=max_rows, max_context=4096, fuse_projections=False)
    graphs.copies_in_graph = True  # as with the Triton backend
    logits = torch.randn(max_rows, engine.shape.vocab_size, generator=torch.Generator().manual_seed(0))

    def run(token_ids, positions, slots, tables, context_lens, groups=(), input_ids=None, copies=(),
            reuse_output=False):
        graphs.stage(token_ids, positions, slots, tables, context_lens, groups, input_ids, copies)
        return logits[: len(token_ids)]

    graphs.run = run
    engine.graphs = graphs
    engine.prefill = lambda tables: logits[: len(tables)]
    return engine


def workloads(engine: Engine, new_tokens: int) -> list[tuple[str, list, object]]:
    gen = torch.Generator().manual_seed(0)
    vocab = engine.shape.vocab_size
    prompt = torch.randint(3, vocab, (512,), generator=gen).tolist()
    system = torch.randint(3, vocab, (1024,), generator=gen).tolist()
    shared = [system + torch.randint(3, vocab, (64,), generator=gen).tolist() for _ in range(256)]
    batch = [torch.randint(3, vocab, (512,), generator=gen).tolist() for _ in range(16)]
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return [("W-sample n=64", prompt, ParallelSampling(engine, n=64, temperature=1.0, top_p=0.9, seed=0, **common)),
            ("W-beam k=8", prompt, BeamSearch(engine, num_beams=8, **common)),
            ("W-beam-batch 16x8", batch, BeamSearch(engine, num_beams=8, **common)),
            ("W-shared 256", shared, Greedy(engine, **common))]


def timed_parts(parts: dict) -> tuple[dict[str, float], list]:
    """Wrap `parts` with timers; returns the totals (seconds) and what restores the originals."""
    totals = {name: 0.0 for name in parts}
    saved = []
    for name, (owner, attr) in parts.items():
        original = getattr(owner, attr)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_name] += time.perf_counter() - start

        saved.append((owner, attr, original))
        setattr(owner, attr, timed)
    return totals, saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=None)
    parser.add_argument("--detail", action="store_true", help="also time the parts of decode and finish")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = staged_engine()
    totals, saved = timed_parts(PARTS | DETAIL if args.detail else PARTS)
    try:
        print(f"host us per decode step (CPU, torch {torch.__version__}, {args.new_tokens} new tokens)")
        for name, prompts, strategy in workloads(engine, args.new_tokens):
            if args.only and args.only not in name:
                continue
            strategy.run(prompts if len(prompts) > 1 else prompts[0])  # warm
            rows = []
            for _ in range(args.repeats):
                for key in totals:
                    totals[key] = 0.0
                result = strategy.run(prompts if len(prompts) > 1 else prompts[0])
                steps = (result[0] if isinstance(result, list) else result).stats.decode_steps
                rows.append({key: 1e6 * value / steps for key, value in totals.items()})
            median = {key: statistics.median(row[key] for row in rows) for key in totals}
            decode = median["decode"] + median["decode_forked"]
            print(f"  {name:20s} decode {decode:7.0f}  finish {median['finish']:7.0f}  "
                  f"host {decode + median['finish']:7.0f}")
            if args.detail:
                print("    " + "  ".join(f"{key} {median[key]:.0f}" for key in DETAIL))
            assert engine.kv_stats().blocks_in_use == 0
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


if __name__ == "__main__":
    main()
