"""Run one shape's cascade parts a few times for Nsight Compute (issue 3): what holds them back.

The kernels of interest run between cudaProfilerStart/Stop, after a warm-up that compiles them, so

    ncu --profile-from-start off --clock-control none --set full -o $OUT/cascade \
        python bench/ncu_cascade.py --shape WKernel

profiles only: the prefix programs alone, the own-key programs alone, the fused default launch
and its merge, and plain paged decode on the same batch (for contrast). Variants come from
bench_cascade_shapes.VARIANTS (``--variants``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_cascade_shapes import DEV, SHAPES, VARIANTS, build, kv_pools  # noqa: E402
from sharedecode.kernels.paged_attention import choose_num_splits, paged_attention  # noqa: E402
from sharedecode.kernels.shared_prefix import find_prefix_groups, shared_prefix_decode  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="WKernel")
    parser.add_argument("--variants", default="prefix_part,own_part,default")
    args = parser.parse_args()
    shape = next(s for s in SHAPES if s.name == args.shape)
    gen = torch.Generator().manual_seed(0)
    block_tables, context_lens, num_blocks = build(shape, gen)
    n = block_tables.shape[0]
    k, v = kv_pools(shape, num_blocks)
    q = torch.randn(n, shape.hq, shape.d, generator=gen).to(DEV, k.dtype)
    qsl = torch.arange(n + 1, dtype=torch.int32, device=DEV)
    scale = shape.d ** -0.5
    groups = dataclasses.replace(find_prefix_groups(block_tables, context_lens, 16),
                                 max_prefix_len=None, max_suffix_len=None)
    splits = choose_num_splits(n, shape.hkv, DEV)
    out = torch.empty_like(q)
    calls = {"plain": lambda i: paged_attention(q, k[i], v[i], block_tables, context_lens, qsl,
                                                scale=scale, out=out, num_splits=splits)}
    for name in args.variants.split(","):
        calls[name] = lambda i, kw={"suffix_splits": splits} | VARIANTS[name]: shared_prefix_decode(
            q, k[i], v[i], block_tables, context_lens, scale=scale, groups=groups, out=out, **kw)
    for call in calls.values():  # compile everything outside the profiled range
        call(0)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, call in calls.items():
        torch.cuda.nvtx.range_push(name)
        for i in range(1, 3):  # two layers' pools, neither the warm-up's (pool 0)
            call(i)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(calls))


if __name__ == "__main__":
    main()
