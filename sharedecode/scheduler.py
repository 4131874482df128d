"""Runs many requests on one engine: batched prefill, one decode forward per step, and memory
pressure handled by deferring and preempting whole requests.

A request (a beam search or a group of samples for one prompt) keeps its live sequences as
`Branch`es: a block table plus the token to feed next. Each step the scheduler decodes every pending
branch of every running request in one forward and hands each request its rows of logits.

When the next step's blocks do not fit, the most recently admitted request is preempted: its blocks
are freed and its branches remember their tokens; it is re-admitted later by recomputing them (a
prefill whose last-token logits are what the skipped decode would have given). Requests wait for
admission in order. Only a request that cannot fit even alone raises `KVCacheFull`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from sharedecode.block_allocator import BlockTable, KVCacheFull
from sharedecode.engine import Engine
from sharedecode.results import GenerationStats


@dataclass(eq=False)
class Branch:
    """A live sequence of a request: its cache view and the token it feeds next."""

    table: BlockTable | None
    next_token: int
    saved_tokens: list[int] | None = None  # tokens to recompute while preempted


class Request:
    """One prompt's decoding state; subclassed by each strategy."""

    def __init__(self, prompt: list[int]):
        self.prompt = prompt
        self.pending: list[Branch] = []
        self.done = False

    def start(self, engine: Engine, table: BlockTable, logits: torch.Tensor) -> None:
        """The prompt was prefilled into `table`; `logits` [V] are its last token's."""
        raise NotImplementedError

    def step(self, engine: Engine, logits: torch.Tensor) -> None:
        """`logits` [len(self.pending), V]: each pending branch's next-token logits."""
        raise NotImplementedError

    def blocks_to_resume(self, engine: Engine) -> int:
        return sum(engine.allocator.blocks_for(len(b.saved_tokens)) for b in self.pending)

    def release(self, engine: Engine) -> None:
        """Free every block this request holds."""
        for branch in self.pending:
            if branch.table is not None:
                engine.free(branch.table)
                branch.table = None


class Scheduler:
    def __init__(self, engine: Engine, stats: GenerationStats | None = None):
        self.engine = engine
        self.stats = stats or GenerationStats()

    def run(self, requests: list[Request]) -> None:
        """Run `requests` to completion."""
        for _ in self.iterate(requests):
            pass

    def iterate(self, requests: list[Request]) -> Iterator[list[Request]]:
        """Run `requests`, yielding the running ones after every step (for live displays).

        On any exception, and when the caller stops iterating early, every block they hold is freed.
        """
        start = time.perf_counter()
        waiting = list(requests)  # not yet started, in order
        preempted: list[Request] = []
        running: list[Request] = []
        try:
            while waiting or preempted or running:
                self._resume(preempted, running)
                if not preempted:
                    self._admit(waiting, running)
                running = [r for r in running if not r.done]
                if running:
                    self._decode(running, preempted)
                    running = [r for r in running if not r.done]
                yield running
        finally:
            for request in requests:
                request.release(self.engine)
            self.stats.wall_time_s += time.perf_counter() - start

    # ---------------------------------------------------------------- admission
    def _admit(self, waiting: list[Request], running: list[Request]) -> None:
        engine = self.engine
        batch: list[tuple[Request, BlockTable]] = []
        while waiting:
            request = waiting[0]
            needed = engine.allocator.blocks_needed_to_allocate(request.prompt)
            # Keep room for one more block per running branch so that admitted work can progress.
            headroom = sum(len(r.pending) for r in running) + len(batch)
            if needed + headroom > engine.num_free_blocks:
                if not running and not batch and needed > engine.allocator.num_blocks:
                    raise KVCacheFull(
                        f"a {len(request.prompt)}-token prompt needs {needed} KV blocks but the cache "
                        f"has {engine.allocator.num_blocks}; raise kv_cache_bytes"
                    )
                if running or batch:
                    break
                # Alone and still not fitting its headroom: try the prompt itself.
                if needed > engine.num_free_blocks:
                    raise KVCacheFull(f"a {len(request.prompt)}-token prompt does not fit the KV cache")
            waiting.pop(0)
            table = engine.add(request.prompt)
            batch.append((request, table))
        if not batch:
            return
        tables = [table for _, table in batch]
        for table in tables:
            self.stats.prompt_tokens += table.num_tokens
            self.stats.prefill_tokens_reused += table.num_cached_tokens
            self.stats.prefill_tokens_computed += table.num_tokens - table.num_cached_tokens
        try:
            logits = engine.prefill(tables)
        except BaseException:
            for table in tables:
                engine.free(table)
            raise
        for (request, table), row in zip(batch, logits):
            running.append(request)
            request.start(engine, table, row)
        self._track_peak(running)

    def _resume(self, preempted: list[Request], running: list[Request]) -> None:
        engine = self.engine
        while preempted:
            request = preempted[0]
            needed = request.blocks_to_resume(engine)
            headroom = sum(len(r.pending) for r in running) + len(request.pending)
            if needed + headroom > engine.num_free_blocks and running:
                return
            if needed > engine.num_free_blocks:
                raise KVCacheFull(
                    f"a request with {len(request.pending)} sequences of up to "
                    f"{max(len(b.saved_tokens) for b in request.pending)} tokens does not fit the KV cache "
                    "even alone; raise kv_cache_bytes or lower num_beams / n"
                )
            preempted.pop(0)
            for branch in request.pending:
                branch.table = engine.add(branch.saved_tokens)
                branch.saved_tokens = None
            tables = [b.table for b in request.pending]
            self.stats.prefill_tokens_computed += sum(t.num_tokens - t.num_cached_tokens for t in tables)
            self.stats.prefill_tokens_reused += sum(t.num_cached_tokens for t in tables)
            logits = engine.prefill(tables)
            running.append(request)
            request.step(engine, logits)
            self._track_peak(running)

    def _preempt(self, request: Request, preempted: list[Request]) -> None:
        for branch in request.pending:
            branch.saved_tokens = branch.table.token_ids + [branch.next_token]
        request.release(self.engine)
        preempted.insert(0, request)
        self.stats.preemptions += 1

    # ---------------------------------------------------------------- decoding
    def _decode(self, running: list[Request], preempted: list[Request]) -> None:
        engine = self.engine
        while True:
            tables = [b.table for r in running for b in r.pending]
            if engine.blocks_needed_for_decode(tables) <= engine.num_free_blocks:
                break
            if len(running) == 1:
                raise KVCacheFull(
                    f"one request's {len(tables)} sequences need more KV blocks than the cache has; "
                    "raise kv_cache_bytes or lower num_beams / n / max_new_tokens"
                )
            victim = running.pop()  # the most recently admitted
            self._preempt(victim, preempted)
        tokens = [b.next_token for r in running for b in r.pending]
        logits = engine.decode(tables, tokens)
        self.stats.decode_steps += 1
        self._track_peak(running)
        offset = 0
        for request in running:
            count = len(request.pending)
            request.step(engine, logits[offset : offset + count])
            offset += count

    def _track_peak(self, running: list[Request]) -> None:
        engine = self.engine
        in_use = engine.allocator.num_blocks_in_use
        bytes_per_token = engine.layout.bytes_per_token
        logical = sum(b.table.num_tokens for r in running for b in r.pending if b.table is not None)
        s = self.stats
        s.peak_blocks_in_use = max(s.peak_blocks_in_use, in_use)
        s.peak_kv_bytes = max(s.peak_kv_bytes, in_use * engine.layout.bytes_per_block)
        s.peak_contiguous_kv_bytes = max(s.peak_contiguous_kv_bytes, logical * bytes_per_token)
