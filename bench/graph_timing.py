"""Timing GPU work as CUDA-graph replays, for the kernel benchmarks: no host launch gaps, so the
numbers are the kernels' (and the small gaps between graph nodes)."""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def replay_us(fn: Callable[[], object], repeats: int = 50, warm: int = 3) -> float:
    """Median microseconds of one replay of a CUDA graph that captures `fn()`. `fn` runs `warm`
    times on a side stream first (compilation, autotuning and allocations stay out of the
    capture), and the graph replays 5 times before the timed ones."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    median = median_replay_us(graph, repeats)
    del graph
    return median


def median_replay_us(graph: torch.cuda.CUDAGraph, repeats: int) -> float:
    """Median microseconds of `repeats` replays of a captured graph, each between CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)
