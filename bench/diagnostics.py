"""What the GPU diagnostic scripts (profile_gpu, step_timeline, find_syncs) share: the model and
engine, the report header with the versions and COMMIT, and the workloads at bench_e2e.py's shapes
(prompt 512, 128 new tokens with EOS banned; prompts drawn from seed 0)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_e2e import HI, build_model  # noqa: E402
from sharedecode import BeamSearch, Engine, Greedy, ParallelSampling  # noqa: E402


def setup(model_name: str) -> tuple[Engine, dict]:
    """The model on the GPU in bf16, an engine with a 16 GiB KV pool, and the report's header."""
    import transformers
    import triton

    device = torch.device("cuda")
    engine = Engine(build_model(model_name, device, torch.bfloat16), backend="auto", kv_cache_bytes=16 * 2**30)
    report = {"card": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "triton": triton.__version__, "transformers": transformers.__version__,
              "commit": os.environ.get("COMMIT", "unknown"), "model": model_name}
    return engine, report


def workloads(engine: Engine, names: list[str], only: str | None = None) -> list[tuple[str, list, object]]:
    """(name, prompts, strategy) for each of `names` (in that order) whose name contains `only`."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, HI, (512,), generator=gen).tolist()
    system = torch.randint(3, HI, (1024,), generator=gen).tolist()
    shared = [system + torch.randint(3, HI, (64,), generator=gen).tolist() for _ in range(256)]
    batch_prompts = [torch.randint(3, HI, (512,), generator=gen).tolist() for _ in range(16)]
    common = dict(max_new_tokens=128, min_new_tokens=128)
    sampling = dict(top_p=0.9, temperature=0.8, seed=0, **common)
    make = {
        "W-beam k=4": lambda: ([prompt], BeamSearch(engine, num_beams=4, **common)),
        "W-beam k=8": lambda: ([prompt], BeamSearch(engine, num_beams=8, **common)),
        "W-sample n=64": lambda: ([prompt], ParallelSampling(engine, n=64, **sampling)),
        "W-sample n=8": lambda: ([prompt], ParallelSampling(engine, n=8, **sampling)),
        "W-shared 256": lambda: (shared, Greedy(engine, **common)),
        "W-beam-batch 16x8": lambda: (batch_prompts, BeamSearch(engine, num_beams=8, **common)),
    }
    return [(name, *make[name]()) for name in names if only is None or only in name]
