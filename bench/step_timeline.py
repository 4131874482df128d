"""Where each decode step's wall time goes, per workload, on the GPU (issue 7).

`profile_gpu.py` shows which ops cost the most; this shows the step as a timeline, without the
profiler's own overhead. For each run of a workload it sums, over the decode steps:
  decode_host   engine.decode up to the graph's replay (allocator, groups, staging)
  launch        the replay call and the engine's return (cudaGraphLaunch, logits clone)
  step_device   the strategies' device part (launches only: the kernels run later)
  wait+host     the rest of Scheduler._decode: the one transfer (waiting for the device) and the
                requests' host part (selection, fork/free, stop checks)
  outside       the scheduler's loop around the steps (filters, admission checks, yields)
  gc            Python's garbage-collector pauses inside the run
and, from CUDA events, the device time of each replay and of the strategies' device part, so that
`gpu_idle = wall - replay - step_device_gpu` is what overlapping host and device could win.
Each workload runs `--repeats` times in three variants, interleaved: the default, without
shared-prefix decode ("plain") and without the scheduler's look-ahead ("no_look_ahead"); every
run's wall time is kept (the median hides nothing here).

    COMMIT=<sha> python bench/step_timeline.py --out $OUT/timeline.json [--model M1] [--only W-beam]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.diagnostics import setup, workloads  # noqa: E402
from sharedecode import Engine  # noqa: E402
from sharedecode.scheduler import Scheduler  # noqa: E402


class Timeline:
    """Monkeypatches the engine and scheduler with timers; `totals()` after each run."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.parts: dict[str, float] = {}
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event, torch.cuda.Event]] = []
        self._gc_start = 0.0
        self.reset()
        self._install()

    def reset(self) -> None:
        self.parts = {k: 0.0 for k in ("decode_host", "launch", "step_device", "wait+host", "decode_total", "gc")}
        self.events = []
        self.steps = 0

    def _gc_callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.parts["gc"] += time.perf_counter() - self._gc_start

    def _install(self) -> None:
        engine, graphs, timeline = self.engine, self.engine.graphs, self
        original_stage, original_decode = graphs.stage, Scheduler._decode
        original_step_device = Scheduler._step_device
        marks: dict[str, float] = {}

        def stage(*args, **kwargs):
            key = original_stage(*args, **kwargs)
            marks["staged"] = time.perf_counter()
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            marks["start_event"] = start
            return key

        def engine_decode(tables, tokens, input_ids=None, _decode=engine.decode, **kw):
            t0 = time.perf_counter()
            out = _decode(tables, tokens, input_ids, **kw)
            t1 = time.perf_counter()
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            marks["replay_end"] = end
            timeline.parts["decode_host"] += marks["staged"] - t0
            timeline.parts["launch"] += t1 - marks["staged"]
            return out

        def step_device(running, logits, counts):
            t0 = time.perf_counter()
            out = original_step_device(running, logits, counts)
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            if "replay_end" in marks:  # (the admission's first-token pass follows no replay)
                timeline.events.append((marks.pop("start_event"), marks.pop("replay_end"), end))
            timeline.parts["step_device"] += time.perf_counter() - t0
            return out

        def decode(scheduler, running, preempted, ahead_allowed=False):
            t0 = time.perf_counter()
            parts = dict(timeline.parts)
            original_decode(scheduler, running, preempted, ahead_allowed)
            total = time.perf_counter() - t0
            timeline.parts["decode_total"] += total
            inner = sum(timeline.parts[k] - parts[k] for k in ("decode_host", "launch", "step_device"))
            timeline.parts["wait+host"] += total - inner
            timeline.steps += 1

        graphs.stage = stage
        engine.decode = engine_decode
        Scheduler._step_device = staticmethod(step_device)
        Scheduler._decode = decode
        gc.callbacks.append(self._gc_callback)

    def totals(self, wall: float) -> dict:
        torch.cuda.synchronize()
        replay = sum(s.elapsed_time(r) for s, r, _ in self.events) / 1e3
        device_step = sum(r.elapsed_time(e) for _, r, e in self.events) / 1e3
        out = {k: round(v * 1e3, 2) for k, v in self.parts.items()}
        out.update(wall_ms=round(wall * 1e3, 2), steps=self.steps, replay_gpu_ms=round(replay * 1e3, 2),
                   step_device_gpu_ms=round(device_step * 1e3, 2),
                   outside_ms=round((wall - self.parts["decode_total"]) * 1e3, 2),
                   gpu_idle_ms=round((wall - replay - device_step) * 1e3, 2))
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="step_timeline.json")
    parser.add_argument("--model", default="M1")
    parser.add_argument("--only", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    engine, report = setup(args.model)
    report["workloads"] = []
    names = ["W-beam k=4", "W-beam k=8", "W-sample n=64", "W-shared 256", "W-sample n=8", "W-beam-batch 16x8"]
    timeline = Timeline(engine)
    for name, prompts, strategy in workloads(engine, names, args.only):
        work = prompts if len(prompts) > 1 else prompts[0]
        variants = {"default": (True, True), "plain": (False, True), "no_look_ahead": (True, False)}
        row = {"workload": name, "runs": {v: [] for v in variants}}
        for shared_prefix, look_ahead in variants.values():  # warm every variant (captures) first
            engine.shared_prefix, engine.look_ahead = shared_prefix, look_ahead
            strategy.run(work)
        for _ in range(args.repeats):
            for variant, (shared_prefix, look_ahead) in variants.items():
                engine.shared_prefix, engine.look_ahead = shared_prefix, look_ahead
                timeline.reset()
                engine.reset_prefix_cache()  # every prompt computed, as HF generate does
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                strategy.run(work)
                torch.cuda.synchronize()
                row["runs"][variant].append(timeline.totals(time.perf_counter() - t0))
        engine.shared_prefix, engine.look_ahead = True, True
        for variant, runs in row["runs"].items():
            walls = [r["wall_ms"] for r in runs]
            median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            row[variant] = median
            print(f"{name:16s} {variant:13s} wall {walls}  median parts {json.dumps(median)}", flush=True)
        report["workloads"].append(row)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
