"""Host time of one prefill layer's attention launches (bench/NOTES.md, item 39).

The compiled prefill of 512 tokens is host-bound, and its profile charges ~400 us per layer to
the `paged_attention_step` custom op. This times, at M1's shapes (32 query heads, 8 KV heads,
head_dim 64, bf16), the host side of each piece: calls queued back to back without a sync
(median us per call over `--calls`), then cProfile's top functions of the op's calls.

    COMMIT=<sha> python bench/host_launch.py --out $OUT/host-launch.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharedecode.attention import _compiled_step, PagedBatch  # noqa: E402
from sharedecode.kernels.paged_attention import paged_attention  # noqa: E402
from sharedecode.kernels.rotary import rope_write_kv  # noqa: E402
from sharedecode.kernels.skinny_matmul import skinny_linear  # noqa: E402


def host_us(fn, calls: int) -> float:
    """Median host microseconds per call over batches of 10 calls (the GPU is not waited for)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls // 10):
        start = time.perf_counter()
        for _ in range(10):
            fn()
        times.append((time.perf_counter() - start) / 10 * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="host_launch.json")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    t, hq, hkv, d, bs, blocks = args.tokens, 32, 8, 64, 16, 4096
    q = torch.randn(t, hq, d, device=device, dtype=dtype)
    k = torch.randn(t, hkv, d, device=device, dtype=dtype)
    v = torch.randn(t, hkv, d, device=device, dtype=dtype)
    pool = torch.zeros(2, 2, blocks, bs, hkv, d, device=device, dtype=dtype)  # [layers, k|v, ...]
    k_cache, v_cache = pool[0, 0], pool[0, 1]
    slots = torch.arange(t, device=device)
    tables = torch.arange(-(-t // bs), device=device, dtype=torch.int32)[None]
    context_lens = torch.tensor([t], device=device, dtype=torch.int32)
    qsl = torch.tensor([0, t], device=device, dtype=torch.int32)
    cos = torch.randn(t, d, device=device, dtype=dtype)
    sin = torch.randn(t, d, device=device, dtype=dtype)
    x = torch.randn(16, 2048, device=device, dtype=dtype)
    w = torch.randn(2048, 2048, device=device, dtype=dtype)
    batch = PagedBatch(pool=None, backend="triton", slot_mapping=slots, block_tables=tables,
                       context_lens=context_lens, query_start_loc=qsl, max_context_len=None, is_decode=False)
    batch.pool = type("Pool", (), {"tensor": pool})()
    pieces = {
        "empty (torch.empty_like)": lambda: torch.empty_like(q),
        "rope_write_kv": lambda: rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots),
        "paged_attention (prefill)": lambda: paged_attention(q, k_cache, v_cache, tables, context_lens, qsl,
                                                            scale=0.125),
        "paged_attention_step op (rotary deferred)": lambda: _compiled_step(q, k, v, batch, 0, 0.125, None, None,
                                                                           None, (cos, sin)),
        "paged_attention_step op (rotary done)": lambda: _compiled_step(q, k, v, batch, 0, 0.125, None, None,
                                                                       None, None),
        "skinny_linear (16 rows)": lambda: skinny_linear(x, w),
        "torch.ops skinny_linear": lambda: torch.ops.sharedecode.skinny_linear(x, w, None),
        "F.linear (16 rows)": lambda: torch.nn.functional.linear(x, w),
    }
    report = {"card": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "commit": os.environ.get("COMMIT", "unknown"), "tokens": t, "host_us": {}}
    import triton

    report["triton"] = triton.__version__
    with torch.inference_mode():
        for name, fn in pieces.items():
            report["host_us"][name] = host_us(fn, args.calls)
            print(f"{name:45s} {report['host_us'][name]:8.1f} us per call (host)", flush=True)
        step = pieces["paged_attention_step op (rotary deferred)"]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(100):
            step()
        profiler.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    report["cprofile_step_op_100_calls"] = text.getvalue()
    print(text.getvalue()[:5000], flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
