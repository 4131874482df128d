"""Parallel sampling's device work per step: the fused top-p kernel against the torch ops (issue 7).

For each shape (rows x vocabulary) the scores are random logits divided by temperature 0.8 (M1's
and M2's vocabularies), top_p 0.9. Checks that the kernel draws the same tokens as the sort-based
torch path from the same noise (and reports the largest log-probability difference), then times
both with CUDA events (median of --repeats calls, each inside a CUDA graph of 10 calls so that
launch costs do not count): `torch` is `race(apply_top_p(...))` as the CPU path runs it,
`fused` is `top_p_sample`.

    COMMIT=<sha> python bench/bench_sampling.py --out $OUT/sampling.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.graph_timing import replay_us  # noqa: E402
from sharedecode.kernels.fused_sampling import top_p_sample  # noqa: E402
from sharedecode.sampling import apply_top_p, race  # noqa: E402

SHAPES = [(8, 32000), (64, 32000), (256, 32000), (64, 128256)]
CALLS_PER_GRAPH = 10


def graph_us(fn, repeats: int) -> float:
    """Median microseconds per call of `fn` replayed in a CUDA graph of CALLS_PER_GRAPH calls."""
    return replay_us(lambda: [fn() for _ in range(CALLS_PER_GRAPH)], repeats=repeats) / CALLS_PER_GRAPH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--top-p", type=float, default=0.9)
    args = parser.parse_args()
    device = torch.device("cuda")
    import triton
    report = {"card": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
              "commit": os.environ.get("COMMIT", "unknown"), "top_p": args.top_p, "rows": []}
    gen = torch.Generator(device=device).manual_seed(0)
    for rows, vocab in SHAPES:
        scores = torch.randn(rows, vocab, device=device, generator=gen) * 3.0 / 0.8
        noise = torch.empty_like(scores).exponential_(generator=gen)
        ref_tokens, ref_logprobs = race(apply_top_p(scores, args.top_p), noise)
        tokens, logprobs = top_p_sample(scores, noise, args.top_p)
        kept = (apply_top_p(scores, args.top_p) > float("-inf")).sum(-1).float().mean().item()
        row = {"rows": rows, "vocab": vocab, "kept_tokens_mean": kept,
               "same_tokens": int((tokens == ref_tokens).sum().item()),
               "logprob_max_abs_diff": (logprobs - ref_logprobs).abs().max().item(),
               "torch_us": graph_us(lambda: race(apply_top_p(scores, args.top_p), noise), args.repeats),
               "fused_us": graph_us(lambda: top_p_sample(scores, noise, args.top_p), args.repeats)}
        row["speedup"] = row["torch_us"] / row["fused_us"]
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
