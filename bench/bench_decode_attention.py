"""Decode attention at model M1's shapes, as the captured decode step runs it (issue 4).

M1: 32 query heads, 8 KV heads, head_dim 64, block size 16, bf16. Each case captures one CUDA
graph of 16 calls, one per layer, each on its own KV pool (as in the model: one layer's KV is not
in L2 when its turn comes) and times its replays; the figure is microseconds per call. Variants:
split-KV count (auto = what the graph path gets without a context hint), key tile, K loaded as
[N, D] rows. Every variant is checked against the float32 torch reference first.

    COMMIT=<sha> python bench/bench_decode_attention.py --out $OUT/decode_attention.json [--head-dim 128]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharedecode.kernels.paged_attention import paged_attention, paged_attention_torch  # noqa: E402
from bench.graph_timing import replay_us  # noqa: E402

HQ, HKV, D, BS, LAYERS = 32, 8, 64, 16, 16
CASES = [(1, 535), (8, 535), (8, 1100), (64, 535), (64, 1100), (128, 640), (256, 1100)]
# --head-dim 128: the small W-kernel cases, where the split count decides (bench_kernels.py)
CASES_128 = [(1, 512), (1, 4096), (8, 512), (8, 4096), (32, 512), (16, 1024)]


def make_layers(batch: int, ctx: int, device) -> tuple[list, torch.Tensor, torch.Tensor, list]:
    blocks_per_seq = -(-ctx // BS)
    num_blocks = batch * blocks_per_seq + 4
    pools = [(torch.randn(num_blocks, BS, HKV, D, device=device, dtype=torch.bfloat16),
              torch.randn(num_blocks, BS, HKV, D, device=device, dtype=torch.bfloat16))
             for _ in range(LAYERS)]
    perm = torch.randperm(num_blocks)[: batch * blocks_per_seq].view(batch, blocks_per_seq)
    tables = perm.to(torch.int32).to(device)
    context = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    queries = [torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16) for _ in range(LAYERS)]
    return pools, tables, context, queries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="decode_attention.json")
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    global D
    D = args.head_dim
    device = torch.device("cuda")
    torch.manual_seed(0)
    variants = {"auto": {}}
    for splits, tile, rows in itertools.product((1, 2, 4, 8), (32, 64), (False, True)):
        variants[f"s{splits}_t{tile}{'_rows' if rows else ''}"] = dict(
            num_splits=splits, _config={"tile_n": tile, "k_rows": rows})
    variants["auto_rows"] = dict(_config={"k_rows": True})
    for splits in (16, 32):
        variants[f"s{splits}_t64"] = dict(num_splits=splits, _config={"tile_n": 64})
    import triton

    report = {"card": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "triton": triton.__version__, "commit": os.environ.get("COMMIT", "unknown"),
              "shapes": dict(Hq=HQ, Hkv=HKV, D=D, block_size=BS, layers=LAYERS), "cases": []}
    for batch, ctx in CASES if D == 64 else CASES_128:
        pools, tables, context, queries = make_layers(batch, ctx, device)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
        ref = paged_attention_torch(queries[0].float(), pools[0][0].float(), pools[0][1].float(), tables,
                                    context, qsl, scale=D ** -0.5)
        row = {"batch": batch, "ctx": ctx, "kv_bytes_per_call": batch * ctx * HKV * D * 2 * 2}
        for name, kw in variants.items():
            out = torch.full_like(queries[0], float("nan"))
            paged_attention(queries[0], *pools[0], tables, context, qsl, scale=D ** -0.5, out=out, **kw)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            outs = [torch.empty_like(q) for q in queries]

            def step(kw=kw, outs=outs):
                for layer in range(LAYERS):
                    paged_attention(queries[layer], *pools[layer], tables, context, qsl, scale=D ** -0.5,
                                    out=outs[layer], **kw)

            us = replay_us(step) / LAYERS
            row[name] = {"us": round(us, 2), "err": err}
            if not err < 2e-2:
                row[name]["bad"] = True
        best = min((v["us"], k) for k, v in row.items() if isinstance(v, dict) and not v.get("bad"))
        row["best"] = best[1]
        report["cases"].append(row)
        print(f"batch {batch:3d} ctx {ctx:5d}: auto {row['auto']['us']:7.2f} us  auto_rows "
              f"{row['auto_rows']['us']:7.2f}  best {best[1]} {best[0]:7.2f} us  "
              f"(floor {row['kv_bytes_per_call'] / 3.0e6:6.2f} us)", flush=True)
        del pools, queries
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(report, indent=1))
    bad = [(c["batch"], c["ctx"], k) for c in report["cases"] for k, v in c.items()
           if isinstance(v, dict) and v.get("bad")]
    print("variants over the error bound:", bad or "none")
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
