"""Runs many requests on one engine: batched prefill, one decode forward per step, and memory
pressure handled by deferring and preempting whole requests.

A request (a beam search or a group of samples for one prompt) keeps its live sequences as
`Branch`es: a block table plus the token to feed next. Each step the scheduler decodes every pending
branch of every running request in one forward and hands each request its rows of logits.

Requests wait for admission in order; one is admitted when its prompt fits with one block of
headroom left for every running sequence and for each sequence it will fork into (what their next
decode step can take). When a step's blocks still do not fit, the most recently started request is
preempted: its blocks are freed and its branches remember their tokens; it is resumed later (before
any new admission) by recomputing them (a prefill whose last-token logits are what the skipped decode
would have given), counting the blocks its branches share (their prompt) once. Only a request that
cannot fit even alone raises `KVCacheFull`; every exception, and closing the iteration early, frees
every block the requests hold.

Look-ahead: when every running request allows it (sampling, greedy and beam search without a
repetition penalty or stop strings, with no request waiting), the next step is launched before this
step's results are read, its input tokens taken on the device from this step's choices, so that the
host's bookkeeping of one step overlaps the device's forward of the next. A sequence that stops is
seen one step late: its row of the step launched ahead is discarded and its blocks freed then. The
tokens are the same either way (noise is drawn per started sequence); that extra row can move
scores in their last bits, as any change of the batch does. Beam search also makes the next step's
block tables on the device (`BeamRequest.decode_ahead`), which the host mirrors a step later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from sharedecode.block_allocator import PENDING_TOKEN, BlockAllocator, BlockTable, KVCacheFull, block_hash
from sharedecode.engine import Engine
from sharedecode.gc_control import full_collections_postponed
from sharedecode.results import GenerationStats
from sharedecode.uploads import upload


@dataclass(eq=False)
class Branch:
    """A live sequence of a request: its cache view and the token it feeds next."""

    table: BlockTable | None
    next_token: int
    saved_tokens: list[int] | None = None  # tokens to recompute while preempted


@dataclass(eq=False)
class LaunchedStep:
    """A step whose device part is queued and whose results are not read yet."""

    requests: list["Request"]
    rows: list[list[Branch]]  # each request's branches as launched, one logits row each
    logits: torch.Tensor
    spans: list[tuple[int, int] | None]  # each request's span of the flat results (None: steps whole)
    flat: torch.Tensor | None  # the flat results on the device
    results: torch.Tensor | None  # their copy in host memory (pinned on CUDA), filled asynchronously
    copied: torch.cuda.Event | None


class Request:
    """One prompt's decoding state; subclassed by each strategy."""

    def __init__(self, prompt: list[int]):
        self.prompt = prompt
        self.pending: list[Branch] = []
        self.done = False
        self.steps_in_flight = 0  # decode steps launched whose results this request has not read

    fills_pending_tokens = True  # steps launched ahead append PENDING_TOKEN, filled in by `_finish`

    def can_look_ahead(self) -> bool:
        """Whether its next step may be launched before this step's results are read: its inputs
        are then the chosen tokens still on the device (`chosen_tokens`), and this step's
        outcome (a stop, a finished sequence) is seen one step late, its extra row discarded."""
        return False

    @staticmethod
    def chosen_tokens(results: torch.Tensor) -> torch.Tensor:
        """The token chosen for each row, on the device, from a look-ahead request's flat results."""
        raise NotImplementedError

    @classmethod
    def decode_ahead(cls, engine: Engine, requests: list["Request"], step: LaunchedStep) -> torch.Tensor | None:
        """The decode of the step after `step`, launched before its results are read: each
        branch's input is the token `step` chose for it, still on the device (placeholders in the
        block tables until `Scheduler._finish` fills them in). None when it does not fit."""
        chosen = cls.chosen_tokens(step.flat)
        launched = [b for rows in step.rows for b in rows]
        branches = [b for r in requests for b in r.pending]
        if branches != launched:  # some sequences stopped at an earlier step: their rows drop out
            where = {id(b): i for i, b in enumerate(launched)}
            chosen = chosen.index_select(0, upload([where[id(b)] for b in branches], chosen.device, torch.int64))
        try:
            # (a step launched ahead exists only for requests whose device part reads its logits)
            return engine.decode([b.table for b in branches], [PENDING_TOKEN] * len(branches), input_ids=chosen,
                                 reuse_output=True)
        except KVCacheFull:
            return None

    def start(self, engine: Engine, table: BlockTable, logits: torch.Tensor) -> None:
        """The prompt was prefilled into `table`; `logits` [V] are its last token's."""
        self.begin(engine, table)
        self.step(engine, logits.unsqueeze(0).expand(len(self.pending), -1))

    def begin(self, engine: Engine, table: BlockTable) -> None:
        """Take over the prefilled `table` and set `pending` up so that the first token is an
        ordinary step over len(pending) copies of the prompt's last-token logits (strategies with
        `step_device_group`: the scheduler runs those first steps of all admitted requests as one)."""
        raise NotImplementedError

    def step(self, engine: Engine, logits: torch.Tensor) -> None:
        """`logits` [len(self.pending), V]: each pending branch's next-token logits."""
        raise NotImplementedError

    def width(self) -> int:
        """How many sequences this request decodes at once: the new blocks its next decode step
        can take at most (one per sequence). Before `start`, the sequences it will fork into."""
        if self.pending:
            return len(self.pending)
        if self.done:
            return 0
        strategy = getattr(self, "strategy", None)  # BeamSearch: num_beams; ParallelSampling: best_of
        count = (getattr(self, "num_beams", None) or getattr(strategy, "best_of", None)
                 or getattr(strategy, "num_beams", None))
        return max(1, int(count or 1))

    def blocks_to_resume(self, engine: Engine) -> int:
        """Free blocks that re-adding every preempted branch takes, counting the blocks the
        branches share with each other (their common prompt) and with the cache once."""
        return blocks_to_allocate_together(engine.allocator, [b.saved_tokens for b in self.pending])

    def release(self, engine: Engine) -> None:
        """Free every block this request holds."""
        for branch in self.pending:
            if branch.table is not None:
                engine.free(branch.table)
                branch.table = None


def reads_logits_at_once(requests: list[Request]) -> bool:
    """Whether every request reads its logits on the device as soon as they exist (its device
    part, queued by `Scheduler._queue_choice` before anything else is launched): then the decode
    may hand out the captured step's own output buffer, which the next step overwrites."""
    return all(hasattr(cls, "step_device_group") or hasattr(cls, "step_device")
               for cls in {type(r) for r in requests})  # (a step holds a few types, hundreds of requests)


def blocks_to_allocate_together(allocator: BlockAllocator, sequences: list[list[int]]) -> int:
    """Free blocks that `allocator.allocate(tokens)` for each of `sequences` in turn takes.

    Mirrors `BlockAllocator.allocate`: each sequence reuses leading full blocks already cached or
    registered by an earlier sequence of the same batch (a cached block at ref count 0 costs one
    free block, as it leaves the evictable pool), and registers its own full blocks for the next.
    """
    bs = allocator.block_size
    registered: set[int] = set()  # hashes the earlier sequences of the batch will register
    revived: set[int] = set()
    needed = 0
    for tokens in sequences:
        matched, previous = 0, None
        for start in range(0, len(tokens) - bs, bs):  # full blocks before the last token
            chunk = tuple(tokens[start : start + bs])
            h = block_hash(previous, chunk)
            block_id = allocator.hash_to_block.get(h)
            if block_id is not None and allocator.block_tokens.get(block_id) == chunk:
                if allocator.ref_counts[block_id] == 0 and block_id not in revived:
                    revived.add(block_id)
                    needed += 1
            elif h not in registered:
                break
            matched += 1
            previous = h
        needed += allocator.blocks_for(len(tokens)) - matched
        for start in range(matched * bs, len(tokens) - bs + 1, bs):  # the full blocks it registers
            h = block_hash(previous, tuple(tokens[start : start + bs]))
            if h in allocator.hash_to_block or h in registered:
                break  # allocate leaves the block unhashed, which breaks the chain after it
            registered.add(h)
            previous = h
    return needed


class Scheduler:
    """Runs requests on one engine; see the module docstring for the memory policy.

    Invariants that keep every loop finite: an iteration of `iterate` either admits or resumes a
    request (whose first step generates a token) or decodes one step of the running ones; a request
    alone in the cache is always admitted or resumed, or raises KVCacheFull when it cannot fit.
    """

    def __init__(self, engine: Engine, stats: GenerationStats | None = None, look_ahead: bool | None = None):
        if look_ahead is None:
            look_ahead = engine.look_ahead
        if not isinstance(look_ahead, bool):
            raise TypeError(f"look_ahead must be True or False, got {look_ahead!r}")
        self.engine = engine
        self.stats = stats or GenerationStats()
        self.look_ahead = look_ahead
        self._in_flight: LaunchedStep | None = None  # launched ahead, results not read

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
        with full_collections_postponed():  # the model and compiler caches make them slow
            try:
                self._check_fits_alone(waiting)
                while waiting or preempted or running:
                    if self._in_flight is None:  # (look-ahead runs only with nothing waiting)
                        self._resume(preempted, running)
                        running = [r for r in running if not r.done]
                        if not preempted:
                            self._admit(waiting, running)
                            running = [r for r in running if not r.done]
                    if running:
                        self._decode(running, preempted, ahead_allowed=not waiting and not preempted)
                        running = [r for r in running if not r.done]
                    yield running
            finally:
                self._in_flight = None  # a step launched ahead writes only into blocks freed below
                for request in requests:
                    request.release(self.engine)
                self.stats.wall_time_s += time.perf_counter() - start

    def _check_fits_alone(self, requests: list[Request]) -> None:
        """Fail before any work for a prompt that cannot fit even in an empty cache."""
        allocator = self.engine.allocator
        for request in requests:
            blocks = allocator.blocks_for(len(request.prompt))
            if blocks > allocator.num_blocks:
                raise KVCacheFull(
                    f"a {len(request.prompt)}-token prompt needs {blocks} KV blocks but the cache has "
                    f"{allocator.num_blocks} (block_size={allocator.block_size}); raise kv_cache_bytes"
                )

    # ---------------------------------------------------------------- admission
    def _admit(self, waiting: list[Request], running: list[Request]) -> None:
        """Start waiting requests, in order, while their prompts fit with room for every running
        sequence (and each admitted request's sequences) to take one more block at the next step."""
        engine = self.engine
        batch: list[tuple[Request, BlockTable]] = []
        headroom = sum(r.width() for r in running)
        try:
            while waiting:
                request = waiting[0]
                needed = engine.allocator.blocks_needed_to_allocate(request.prompt)
                width = request.width()
                if needed + headroom + width > engine.num_free_blocks:
                    if running or batch:
                        break  # wait for the running requests to make room
                    # Alone in the cache: start it if its prompt fits; its steps raise if they can't.
                    if needed > engine.num_free_blocks:
                        raise KVCacheFull(
                            f"a {len(request.prompt)}-token prompt needs {needed} KV blocks, "
                            f"{engine.num_free_blocks} of {engine.allocator.num_blocks} are free"
                        )
                table = engine.add(request.prompt)
                waiting.pop(0)
                batch.append((request, table))
                headroom += width
            if not batch:
                return
            tables = [table for _, table in batch]
            for table in tables:
                self.stats.prompt_tokens += table.num_tokens
                self.stats.prefill_tokens_reused += table.num_cached_tokens
                self.stats.prefill_tokens_computed += table.num_tokens - table.num_cached_tokens
            logits = engine.prefill(tables)
            begun, rows = [], []
            for row in logits:
                request, table = batch[0]
                running.append(request)
                if hasattr(type(request), "step_device_group"):
                    request.begin(engine, table)
                    begun.append(request)
                    rows.append(row)
                else:
                    request.start(engine, table, row)
                batch.pop(0)  # started: the request owns (and frees) its table
            if begun:  # every first token in one device pass and one transfer, like a decode step
                logits = torch.cat([row.expand(len(r.pending), -1) for row, r in zip(rows, begun)])
                self._finish(self._queue_choice(begun, logits))
        finally:
            # Tables not handed over because an exception interrupted admission (a request's start
            # included: it may have failed before taking its table; freeing twice is harmless).
            for _, table in batch:
                engine.free(table)
        self._track_peak(running)

    def _resume(self, preempted: list[Request], running: list[Request]) -> None:
        """Recompute preempted requests (most recently preempted first) while they fit with room for
        one more block per running sequence; alone in the cache, one always resumes or raises."""
        engine = self.engine
        while preempted:
            request = preempted[0]
            needed = request.blocks_to_resume(engine)
            headroom = sum(r.width() for r in running) + request.width()
            alone = not any(r.pending for r in running)
            if needed + headroom > engine.num_free_blocks and not alone:
                return
            if needed > engine.num_free_blocks or not self._readd(request):
                if not alone:
                    return
                raise KVCacheFull(
                    f"a request with {len(request.pending)} sequences of up to "
                    f"{max(len(b.saved_tokens) for b in request.pending)} tokens needs {needed} KV "
                    f"blocks, more than the {engine.num_free_blocks} the cache has free with nothing "
                    "else running; raise kv_cache_bytes or lower num_beams / n"
                )
            preempted.pop(0)
            running.append(request)
            tables = [b.table for b in request.pending]
            self.stats.prefill_tokens_computed += sum(t.num_tokens - t.num_cached_tokens for t in tables)
            self.stats.prefill_tokens_reused += sum(t.num_cached_tokens for t in tables)
            logits = engine.prefill(tables)
            request.step(engine, logits)
            self._track_peak(running)

    def _readd(self, request: Request) -> bool:
        """Allocate the preempted request's branches again; False (nothing held) if they don't fit."""
        try:
            for branch in request.pending:
                branch.table = self.engine.add(branch.saved_tokens)
        except KVCacheFull:
            request.release(self.engine)
            return False
        except BaseException:
            request.release(self.engine)
            raise
        for branch in request.pending:
            branch.saved_tokens = None
        return True

    def _preempt(self, request: Request, preempted: list[Request]) -> None:
        for branch in request.pending:
            branch.saved_tokens = branch.table.token_ids + [branch.next_token]
        request.release(self.engine)
        preempted.insert(0, request)
        self.stats.preemptions += 1

    # ---------------------------------------------------------------- decoding
    def _decode(self, running: list[Request], preempted: list[Request], ahead_allowed: bool = False) -> None:
        """One decode step of every running request (the one launched ahead, if any): launch it,
        launch the next one ahead when every request allows it, then read this one's results."""
        step = self._in_flight or self._launch(running, preempted)
        self._in_flight = None
        if ahead_allowed and self.look_ahead and all(r.can_look_ahead() for r in running) \
                and len({type(r) for r in running}) == 1:
            self._in_flight = self._launch_ahead(running, step)
        self._finish(step, self._in_flight)

    def _launch(self, running: list[Request], preempted: list[Request]) -> LaunchedStep:
        """Launch one step from the host's tokens; when its blocks do not fit, the most recently
        started requests are preempted first. Alone and not fitting: KVCacheFull."""
        engine = self.engine
        while True:
            tables = [b.table for r in running for b in r.pending]
            tokens = [b.next_token for r in running for b in r.pending]
            try:  # the engine checks the step's blocks first and changes nothing when they don't fit
                logits = engine.decode(tables, tokens, reuse_output=reads_logits_at_once(running))
                break
            except KVCacheFull:
                if len(running) == 1:
                    needed = engine.blocks_needed_for_decode(tables)
                    raise KVCacheFull(
                        f"one request's {len(tables)} sequences need {needed} new KV blocks for their "
                        f"next token, {engine.num_free_blocks} of {engine.allocator.num_blocks} are free "
                        "with nothing else running; raise kv_cache_bytes or lower num_beams / n / "
                        "max_new_tokens"
                    ) from None
            victim = running.pop()  # the most recently started
            self._preempt(victim, preempted)
        self.stats.decode_steps += 1
        self._track_peak(running)
        return self._queue_choice(running, logits)

    def _launch_ahead(self, running: list[Request], step: LaunchedStep) -> LaunchedStep | None:
        """Launch the step after `step` before reading its results (`Request.decode_ahead`). None
        when its blocks do not fit (the next call launches it the ordinary way, preempting if it must)."""
        logits = type(running[0]).decode_ahead(self.engine, running, step)
        if logits is None:
            return None
        self.stats.decode_steps += 1
        self._track_peak(running)
        return self._queue_choice(running, logits)

    def _queue_choice(self, requests: list[Request], logits: torch.Tensor) -> LaunchedStep:
        """Queue the requests' device part of a step on `logits` (each request's `len(pending)`
        rows, in order) and the copy of its small results to host memory, without waiting."""
        rows = [list(r.pending) for r in requests]
        flats, spans = self._step_device(requests, logits, [len(r) for r in rows])
        flat = results = copied = None
        if flats:
            flat = flats[0] if len(flats) == 1 else torch.cat(flats)
            results = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=flat.is_cuda)
            results.copy_(flat, non_blocking=True)
            if flat.is_cuda:
                copied = torch.cuda.Event()
                copied.record()
        for request in requests:
            request.steps_in_flight += 1
        return LaunchedStep(requests, rows, logits, spans, flat, results, copied)

    def _finish(self, step: LaunchedStep, ahead: LaunchedStep | None = None) -> None:
        """Read `step`'s results and let each request do its host part (one transfer for all of
        them: no per-request tensor op, which with hundreds of requests costs the most). A request
        finished while `step` was queued ignores its rows. With `ahead` launched from this step's
        device tokens, the block tables get those tokens now that the host knows them."""
        engine = self.engine
        if step.copied is not None:
            step.copied.synchronize()
        host = step.results.tolist() if step.results is not None else []
        offset = 0
        for request, rows, span in zip(step.requests, step.rows, step.spans):
            request.steps_in_flight -= 1
            if request.done:
                pass
            elif span is None:
                request.step(engine, step.logits[offset : offset + len(rows)])
            elif rows == request.pending:
                request.step_host(engine, host[span[0] : span[1]])
            else:  # branches that stopped at an earlier step still have rows here
                request.step_host(engine, host[span[0] : span[1]], rows)
            offset += len(rows)
        if ahead is not None and type(ahead.requests[0]).fills_pending_tokens:
            live = [b for rows in ahead.rows for b in rows if b.table is not None]
            engine.allocator.fill_last_tokens([b.table for b in live], [b.next_token for b in live])

    @staticmethod
    def _step_device(running: list[Request], logits: torch.Tensor,
                     counts: list[int]) -> tuple[list[torch.Tensor], list[tuple[int, int] | None]]:
        """The device part of the step: flat result tensors, and each request's span of their
        concatenation (None: it steps whole). Request i's rows of `logits` are the next `counts[i]`.
        Consecutive requests of one strategy that offer `step_device_group` share one pass over
        their rows (a view: nothing is copied) and one result tensor."""
        flats: list[torch.Tensor] = []
        spans: list[tuple[int, int] | None] = []
        start, offset, position = 0, 0, 0
        while start < len(running):
            request = running[start]
            end = start + 1
            group = getattr(type(request), "step_device_group", None)
            while group is not None and end < len(running) and type(running[end]) is type(request) \
                    and running[end].strategy is request.strategy:
                end += 1
            rows = sum(counts[start:end])
            if group is not None:
                flat, sizes = group(running[start:end], logits[offset : offset + rows])
            elif hasattr(request, "step_device"):
                flat = request.step_device(logits[offset : offset + rows])
                sizes = [flat.numel()]
            else:
                flat, sizes = None, [None]
            if flat is not None:
                flats.append(flat)
            for size in sizes:
                spans.append(None if size is None else (position, position + size))
                position += size or 0
            start, offset = end, offset + rows
        return flats, spans

    def _track_peak(self, running: list[Request]) -> None:
        engine = self.engine
        in_use = engine.allocator.num_blocks_in_use
        bytes_per_token = engine.layout.bytes_per_token
        logical = sum(b.table.num_tokens for r in running for b in r.pending if b.table is not None)
        s = self.stats
        s.peak_blocks_in_use = max(s.peak_blocks_in_use, in_use)
        s.peak_kv_bytes = max(s.peak_kv_bytes, in_use * engine.layout.bytes_per_block)
        s.peak_contiguous_kv_bytes = max(s.peak_contiguous_kv_bytes, logical * bytes_per_token)
