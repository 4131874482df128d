"""Shared-prefix (cascade) decode at the shapes the engine meets, over launch configs (issue 3, 7).

The cascade's defaults were tuned on W-kernel's shape (64 sequences x 4,096 shared + 128 own,
head_dim 128). The engine's workloads on M1 (head_dim 64) are different: W-shared 256 has 256
sequences behind a 1,024-token prefix, so most bytes are the sequences' own keys, not the prefix.
For each shape this times, as the engine's CUDA graphs launch it (split counts from the shapes
alone, no length hints), plain paged decode and the cascade under several configs: one CUDA graph
of `LAYERS` calls, each on its own KV pool (as the model's layers are), median of replays,
microseconds per call. Every variant is checked against the fp32 torch reference first.

    COMMIT=<sha> python bench/bench_cascade_shapes.py --out $OUT/cascade.json [--only WS256]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.graph_timing import replay_us  # noqa: E402
from sharedecode.kernels.paged_attention import (  # noqa: E402
    choose_num_splits, paged_attention, paged_attention_torch)
from sharedecode.kernels.shared_prefix import find_prefix_groups, shared_prefix_decode  # noqa: E402

DEV = torch.device("cuda")
DT = torch.bfloat16
BS = 16
LAYERS = 16


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    groups: int  # groups of sequences, each sharing its own prefix
    members: int  # sequences per group
    prefix: int  # shared tokens per group
    own: int  # each sequence's own tokens after the prefix
    hq: int = 32
    hkv: int = 8
    d: int = 64


SHAPES = [
    Shape("WS256", 1, 256, 1024, 128),  # W-shared 256 on M1, mid-generation
    Shape("WS32", 1, 32, 1024, 128),  # W-shared 32
    Shape("WSample64", 1, 64, 512, 64),  # W-sample n=64
    Shape("WBeamBatch", 16, 8, 512, 64),  # W-beam-batch 16 x 8
    Shape("WKernel", 1, 64, 4096, 128, d=128),  # issue 3's target shape
    Shape("WS256own", 1, 256, 0, 128),  # WS256's own keys alone: plain decode's time for them
]


def v(ps=None, suffix_splits=None, **cfg):
    """A variant's keywords: prefix / suffix split counts (None: the launch's own), `_config`."""
    kw = {"prefix_splits": ps, "_config": cfg or None}
    return kw | {"suffix_splits": suffix_splits} if suffix_splits else kw


VARIANTS = {
    "default": v(),
    "separate": v(separate=True),
    "separate_sw2": v(separate=True, suffix_warps=2),
    "separate_sw8": v(separate=True, suffix_warps=8),
    "separate_st32": v(separate=True, suffix_tile=32),
    "separate_st128": v(separate=True, suffix_tile=128),
    "ps1": v(1),
    "ps2": v(2),
    "ps4": v(4),
    "ps8": v(8),
    "st32": v(suffix_tile=32),
    "st128": v(suffix_tile=128),
    "pt64": v(prefix_tile=64),
    "m128_pt64_w8": v(prefix_m=128, prefix_tile=64, num_warps=8),
    "m32": v(prefix_m=32),
    "ns2": v(num_stages=2),
    "ns4": v(num_stages=4),
    "separate_ps2": v(2, separate=True),
    "mh1": v(merge_heads=1),  # the merge with 1 / 4 / 32 heads of a sequence per program
    "mh4": v(merge_heads=4),
    "mh32": v(merge_heads=32),
    # the eleventh session's defaults (16-bit partials, register caps, merge width, 8/3 waves of
    # prefix programs at head_dim 128) taken apart
    "old_default": v(half_partials=False, maxnreg=None, merge_heads=8),  # the tenth session's
    "fp32_partials": v(half_partials=False),
    "no_cap": v(maxnreg=None),
    "mh8": v(merge_heads=8),
    "ps12": v(12),
    "ss2": v(suffix_splits=2),
    # timing only (an incomplete result, not checked): each part of the default launch alone
    "prefix_part": v(part="prefix"),
    "own_part": v(part="own"),
}
TIMING_ONLY = {"prefix_part", "own_part"}


def build(shape: Shape, gen: torch.Generator):
    """One layer's inputs: block tables with each group's prefix pages shared, pages scattered."""
    n = shape.groups * shape.members
    prefix_blocks, own_blocks = shape.prefix // BS, -(-shape.own // BS)
    num_blocks = shape.groups * prefix_blocks + n * own_blocks + 8
    perm = torch.randperm(num_blocks, generator=gen)
    rows, at = [], 0
    for _ in range(shape.groups):
        prefix = perm[at: at + prefix_blocks]
        at += prefix_blocks
        for _ in range(shape.members):
            rows.append(torch.cat([prefix, perm[at: at + own_blocks]]))
            at += own_blocks
    block_tables = torch.stack(rows).int().to(DEV)
    context_lens = torch.full((n,), shape.prefix + shape.own, dtype=torch.int32, device=DEV)
    return block_tables, context_lens, num_blocks


def kv_pools(shape: Shape, num_blocks: int):
    gen = torch.Generator(device=DEV).manual_seed(1)
    k = torch.randn(LAYERS, num_blocks, BS, shape.hkv, shape.d, generator=gen, device=DEV, dtype=DT)
    return k, torch.randn(k.shape, generator=gen, device=DEV, dtype=DT)


def graph_us(calls) -> float:
    """Median microseconds per call of a CUDA graph of `calls` (one per layer), L2 not flushed
    (the layers' pools together are far larger than L2)."""
    return replay_us(lambda: [call() for call in calls], repeats=20, warm=1) / len(calls)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_shape(shape: Shape, names: list[str] | None = None) -> dict:
    gen = torch.Generator().manual_seed(0)
    block_tables, context_lens, num_blocks = build(shape, gen)
    n = block_tables.shape[0]
    k, vv = kv_pools(shape, num_blocks)
    q = torch.randn(n, shape.hq, shape.d, generator=gen).to(DEV, DT)
    qsl = torch.arange(n + 1, dtype=torch.int32, device=DEV)
    scale = shape.d ** -0.5
    ref = paged_attention_torch(q, k[0], vv[0], block_tables, context_lens, qsl, scale=scale)
    groups = find_prefix_groups(block_tables, context_lens, BS)
    # as the engine's graphs launch it: split counts from the shapes alone
    groups = dataclasses.replace(groups, max_prefix_len=None, max_suffix_len=None)
    splits = choose_num_splits(n, shape.hkv, DEV)
    outs = [torch.empty_like(q) for _ in range(LAYERS)]
    kv_bytes = (shape.groups * shape.prefix + n * shape.own) * shape.hkv * shape.d * 2 * 2
    row = {"shape": dataclasses.asdict(shape), "distinct_kv_bytes_per_call": kv_bytes, "variants": {}}

    def plain(i):
        return lambda: paged_attention(q, k[i], vv[i], block_tables, context_lens, qsl, scale=scale,
                                       out=outs[i], num_splits=splits)

    def cascade(i, kw):
        kw = {"suffix_splits": splits} | kw
        return lambda: shared_prefix_decode(q, k[i], vv[i], block_tables, context_lens, scale=scale,
                                            groups=groups, out=outs[i], **kw)

    candidates = {"plain": plain} | {name: (lambda i, kw=kw: cascade(i, kw)) for name, kw in VARIANTS.items()
                                     if names is None or name in names}
    for name, make in candidates.items():
        r = row["variants"][name] = {}
        try:
            outs[0].fill_(float("nan"))
            make(0)()
            torch.cuda.synchronize()
            r["err"] = float("nan") if name in TIMING_ONLY else rel(outs[0], ref)
            if name not in TIMING_ONLY and not r["err"] < 2e-2:
                r["note"] = "wrong result: not timed"
                continue
            r["us"] = graph_us([make(i) for i in range(LAYERS)])
            r["GBps"] = kv_bytes / r["us"] / 1e3
        except Exception as error:  # noqa: BLE001 - a config that does not compile is a result too
            r["note"] = f"failed: {error!r}"[:300]
        print(f"  {shape.name:11s} {name:16s} err {r.get('err', float('nan')):.1e} "
              f"{r.get('us', float('nan')):8.1f} us  {r.get('GBps', 0):6.0f} GB/s {r.get('note', '')}", flush=True)
    timed = {name: r["us"] for name, r in row["variants"].items()
             if "us" in r and name != "plain" and name not in TIMING_ONLY}
    if timed:
        best = min(timed, key=timed.get)
        row["best"] = best
        row["best_vs_default"] = timed.get("default", float("nan")) / timed[best]
        row["plain_vs_best"] = row["variants"]["plain"].get("us", float("nan")) / timed[best]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="cascade_shapes.json")
    parser.add_argument("--only", default=None, help="shape names, comma-separated")
    parser.add_argument("--variants", default=None, help="variant names, comma-separated (plain always runs)")
    args = parser.parse_args()
    import triton
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": os.environ.get("COMMIT", "unknown"), "layers_per_graph": LAYERS, "shapes": []}
    for shape in SHAPES:
        if args.only and shape.name not in args.only.split(","):
            continue
        report["shapes"].append(run_shape(shape, args.variants.split(",") if args.variants else None))
        Path(args.out).write_text(json.dumps(report, indent=1))
    print("\n| shape | plain us | default us | best | best us | best vs default |")
    for row in report["shapes"]:
        vs = row["variants"]
        print(f"| {row['shape']['name']} | {vs['plain'].get('us', float('nan')):.1f} | "
              f"{vs['default'].get('us', float('nan')):.1f} | {row.get('best')} | "
              f"{vs.get(row.get('best'), {}).get('us', float('nan')):.1f} | {row.get('best_vs_default', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
