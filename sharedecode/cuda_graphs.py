"""Decode steps captured as CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is dozens of short kernels per layer; launching them from Python
costs more than running them. Each bucket's graph reads static input buffers (token ids, positions,
slots, block tables, context lengths) and writes static logits; a step copies its inputs in,
replays, and reads the first n rows. Padding rows write nowhere (slot -1) and attend to one token.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from sharedecode.attention import PagedBatch, paged_attention_enabled
from sharedecode.fused_projections import ProjectionFuser

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, engine, max_batch: int = 256, max_context: int = 32768,
                 num_splits: int | None = None, compile: bool = False, fuse_projections: bool = True):
        self.engine = engine
        self.num_splits = num_splits
        # torch.compile before capture fuses the model's norms, rotary and activations into fewer
        # kernels (the paged attention stays an opaque custom op); batch sizes after the first
        # bucket share one dynamic-shape compilation.
        self.compiled = torch.compile(self._model_step) if compile else None
        self.fuser = ProjectionFuser(engine.model) if fuse_projections else None
        self.buckets = [b for b in BUCKETS if b <= max_batch]
        self.max_batch = self.buckets[-1]
        self.max_blocks = -(-max_context // engine.block_size)
        device = engine.device
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # graph memory pool shared by all buckets

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.max_batch and max_blocks <= self.max_blocks

    def _batch(self, size: int) -> PagedBatch:
        return PagedBatch(
            pool=self.engine.pool,
            backend=self.engine.backend,
            slot_mapping=self.slots[:size],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_context_len=None,
            is_decode=True,
            num_splits=self.num_splits,
        )

    def _model_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        out = self.engine.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                sharedecode_batch=batch)
        return out.logits[0].float()

    def _forward(self, size: int) -> torch.Tensor:
        step = self.compiled or self._model_step
        return step(self.input_ids[None, :size], self.positions[None, :size], self._batch(size))

    def _warm_up(self, size: int) -> None:
        """Run the step off the graph first: compilation, Triton's and cuBLAS's choices happen here."""
        try:
            for _ in range(3):
                self._forward(size)
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager capture
            if self.compiled is None:
                raise
            warnings.warn(f"torch.compile of the decode step failed ({type(error).__name__}: {error}); "
                          "capturing the uncompiled model instead", RuntimeWarning, stacklevel=3)
            self.compiled = None
            for _ in range(2):
                self._forward(size)

    def _capture(self, size: int) -> None:
        model = self.engine.model
        fused = self.fuser.active() if self.fuser is not None else contextlib.nullcontext()
        with torch.inference_mode(), paged_attention_enabled(model), fused:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._warm_up(size)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(size)
            self.pool = graph.pool()
        self.graphs[size] = (graph, logits)

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            context_lens: list[int]) -> torch.Tensor:
        n = len(token_ids)
        size = next(b for b in self.buckets if b >= n)
        if size not in self.graphs:
            self._capture(size)
        width = max(len(t) for t in tables)
        host = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        pad = size - n
        self.input_ids[:size].copy_(torch.tensor(token_ids + [0] * pad), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slots[:size].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        self.context_lens[:size].copy_(torch.tensor(context_lens + [1] * pad, dtype=torch.int32),
                                       non_blocking=True)
        self.block_tables[:n, :width].copy_(host, non_blocking=True)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n].clone()  # the static buffer is overwritten by the next replay
