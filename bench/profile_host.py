"""Host time per decode step of beam search, on CPU with a tiny Llama (no GPU needed).

The model is tiny (hidden 64, 2 layers) but its vocabulary is 32,000, so the vocabulary-sized ops of
a beam step (log_softmax, top-k over k x V) cost what they cost on a real model's logits, while the
forward itself is cheap. Workloads have the shapes of bench_e2e.py's W-beam-batch (16 prompts of
512 tokens, 8 beams) and W-beam (1 prompt, 8 and 16 beams), with EOS banned (min_new_tokens =
max_new_tokens) so that every step decodes every beam.

Each decode step's time is split (time.perf_counter around the methods involved):
  forward       the model call inside Engine.decode
  decode-host   the rest of Engine.decode: appends, slot mapping, mark_computed, input tensors
                (and on CPU the copy-on-write block copies themselves)
  step_device   Scheduler._step_device (log_softmax, processors, running scores, top-K)
  transfer      the device->host move of every request's result, and the rest of
                Scheduler._decode's own lines (the step's block count, peak tracking)
  select        the requests' host part (step_host / step_host_group) less fork and free
  fork/free     Engine.fork and Engine.free called from the host part
  other         the rest of the scheduler loop (peak tracking, filtering finished requests)
Each part is the median over --repeats runs. On CPU, step_device is mostly the vocabulary-sized
compute (on a GPU that runs on the device); what costs host time there is one launch per op, so
the ops that step_device and the host part dispatch per step are counted too (a TorchDispatchMode,
in a separate short run).

    python bench/profile_host.py [--new-tokens 32] [--repeats 3] [--vocab 32000] [--cprofile]
                                 [--only W-beam-batch]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from sharedecode.engine import Engine
from sharedecode.scheduler import Scheduler
from sharedecode.strategies import BeamSearch
from sharedecode.strategies.beam_search import BeamRequest

VOCAB = 32000
PARTS = ["forward", "decode-host", "step_device", "transfer", "select", "fork/free", "other"]


def build_engine(vocab: int = VOCAB) -> Engine:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=2, bos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    return Engine(model, backend="torch", kv_cache_bytes=256 * 2**20)


class Timers:
    """Accumulates seconds per part while `active` (decode steps only, not prefill / start)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.active = False

    def wrap(self, owner, name: str, part: str, *, count_step: bool = False):
        """Time `owner.name` into `part`; returns what to restore with `unwrap`."""
        original = getattr(owner, name)
        static = isinstance(vars(owner).get(name), staticmethod)
        timers = self

        def timed(*args, **kwargs):
            if count_step:
                timers.active = True
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if timers.active:
                    timers.seconds[part] += time.perf_counter() - start
                if count_step:
                    timers.active = False
                    timers.steps += 1

        saved = vars(owner).get(name)
        setattr(owner, name, staticmethod(timed) if static else timed)
        return saved

    @staticmethod
    def unwrap(owner, name: str, saved) -> None:
        if saved is None:
            delattr(owner, name)  # an instance attribute shadowing the class's method
        else:
            setattr(owner, name, saved)


@contextmanager
def instrumented(engine: Engine):
    """Timers around the scheduler's decode step and the calls it makes."""
    timers = Timers()
    wrapped = [(Scheduler, "_decode", "step total", True), (Scheduler, "_step_device", "step_device", False),
               (engine.model, "forward", "forward", False), (Engine, "decode", "decode total", False),
               (Engine, "fork", "fork/free", False), (Engine, "free", "fork/free", False),
               (Engine, "fork_into", "fork/free", False)]
    for name in ("step_host", "step_host_group"):
        if name in vars(BeamRequest):
            wrapped.append((BeamRequest, name, "host total", False))
    saved = [timers.wrap(owner, name, part, count_step=count) for owner, name, part, count in wrapped]
    try:
        yield timers
    finally:
        for (owner, name, _, _), original in reversed(list(zip(wrapped, saved))):
            Timers.unwrap(owner, name, original)


def breakdown(timers: Timers) -> dict[str, float]:
    """Milliseconds per decode step for each of PARTS."""
    s = timers.seconds
    parts = {
        "forward": s["forward"],
        "decode-host": s["decode total"] - s["forward"],
        "step_device": s["step_device"],
        "select": s["host total"] - s["fork/free"],
        "fork/free": s["fork/free"],
    }
    inner = s["decode total"] + s["step_device"] + s["host total"]
    parts["transfer"] = s["step total"] - inner  # _decode's own lines: slicing, cat, .cpu(), split
    parts["other"] = s["loop total"] - s["step total"]
    steps = max(1, timers.steps)
    return {name: 1e3 * parts[name] / steps for name in PARTS}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (on a GPU: about one kernel launch each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(engine: Engine, prompts: list[list[int]], num_beams: int) -> dict[str, float]:
    """Aten ops per decode step inside step_device and inside the requests' host part."""
    counts = defaultdict(int)
    wrapped = [(Scheduler, "_step_device", "step_device ops")]
    wrapped += [(BeamRequest, name, "host ops") for name in ("step_host", "step_host_group")
                if name in vars(BeamRequest)]
    saved = []
    for owner, name, part in wrapped:
        original = getattr(owner, name)
        static = isinstance(vars(owner).get(name), staticmethod)

        def counted(*args, _original=original, _part=part, **kwargs):
            with OpCounter() as counter:
                try:
                    return _original(*args, **kwargs)
                finally:
                    counts[_part] += counter.count

        saved.append(vars(owner).get(name))
        setattr(owner, name, staticmethod(counted) if static else counted)
    steps = 4
    try:
        result = BeamSearch(engine, num_beams=num_beams, max_new_tokens=steps + 1,
                            min_new_tokens=steps + 1).run(prompts)
    finally:
        for (owner, name, _), original in zip(wrapped, saved):
            setattr(owner, name, original)
    assert (result if isinstance(result, list) else [result])[0].stats.decode_steps == steps
    return {part: counts[part] / steps for part in ("step_device ops", "host ops")}


def run_workload(engine: Engine, prompts: list[list[int]], num_beams: int, new_tokens: int,
                 profile: bool) -> tuple[dict[str, float], int]:
    strategy = BeamSearch(engine, num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    profiler = cProfile.Profile() if profile else None
    with instrumented(engine) as timers:
        steps = strategy.stream(prompts)
        next(steps)  # admission (prefill, each request's first selection) and the first decode step
        timers.seconds.clear()
        timers.steps = 0
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        for _ in steps:
            pass
        if profiler:
            profiler.disable()
        timers.seconds["loop total"] = time.perf_counter() - start
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    assert engine.kv_stats().blocks_in_use == 0
    return breakdown(timers), timers.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=VOCAB,
                        help="a small vocabulary (e.g. 512) leaves mostly the per-op host cost in step_device")
    parser.add_argument("--cprofile", action="store_true", help="print cProfile's top functions per workload")
    parser.add_argument("--only", default=None, help="run only the workloads whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = build_engine(args.vocab)
    rng = random.Random(0)
    prompts = [[rng.randrange(4, args.vocab) for _ in range(args.prompt_len)] for _ in range(16)]
    workloads = [("W-beam-batch 16x8", prompts, 8), ("W-beam k=8", prompts[:1], 8),
                 ("W-beam k=16", prompts[:1], 16)]
    print(f"host ms per decode step (CPU, torch {torch.__version__}, {args.threads} thread(s), "
          f"vocab {args.vocab}, prompt {args.prompt_len}, {args.new_tokens} new tokens)")
    print(f"{'workload':<18}" + "".join(f"{p:>12}" for p in PARTS) + f"{'non-fwd':>9}{'total':>8}"
          f"{'dev ops':>9}{'host ops':>9}")
    for name, batch, k in workloads:
        if args.only and args.only not in name:
            continue
        BeamSearch(engine, num_beams=k, max_new_tokens=4).run(batch[:1])  # warm-up: first-call costs
        runs = [run_workload(engine, batch, k, args.new_tokens, args.cprofile) for _ in range(args.repeats)]
        ms = {p: statistics.median(r[0][p] for r in runs) for p in PARTS}
        ops = count_ops(engine, batch, k)
        host = sum(v for p, v in ms.items() if p != "forward")
        print(f"{name:<18}" + "".join(f"{ms[p]:>12.3f}" for p in PARTS)
              + f"{host:>9.3f}{sum(ms.values()):>8.3f}{ops['step_device ops']:>9.0f}{ops['host ops']:>9.0f}"
              f"   ({runs[0][1]} steps)", flush=True)


if __name__ == "__main__":
    main()
