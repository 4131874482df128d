"""Beam search with Hugging Face's exact semantics, on forked block tables.

The arithmetic follows transformers' `GenerationMixin._beam_search` step for step (same tensors,
same order of float operations, same top-k tie-breaking), so tokens and `sequences_scores` match
`model.generate(num_beams=k, do_sample=False)`. What differs is the memory: the prompt is prefilled
once, each surviving beam takes over its parent's block table or forks it (ref counts, no copy),
losers are freed at once, and only a beam that appends into a still-shared partial block copies it.

And the host cost per step: the requests of one strategy share one device pass (log_softmax,
processors, running scores, per-request top-K: a handful of kernels for the whole batch), and each
request's selection over its few top-K candidates runs as plain Python on float32 values, rounding
every operation to float32 exactly as the tensors did (`_select`).
"""

from __future__ import annotations

import math
import struct
from array import array
from functools import lru_cache

import torch

from sharedecode.block_allocator import PENDING_TOKEN, KVCacheFull
from sharedecode.engine import Engine
from sharedecode.results import GeneratedSequence
from sharedecode.sampling import apply_repetition_penalty, ban_tokens_
from sharedecode.uploads import to_device, upload
from sharedecode.scheduler import Branch, LaunchedStep, Request
from sharedecode.strategies.base import StopRule, Strategy, check_float, check_int
from sharedecode.strategies.diverse_beam_search import DiverseBeamRequest

NEG = -1.0e9  # HF's "impossible" score (a float32 value)
_eos_tensors: dict[tuple, torch.Tensor] = {}


def _on_kernels(tensor: torch.Tensor) -> bool:
    """Whether beam search's device work runs as the Triton kernels of `kernels/beam_select.py`
    (CUDA: a few launches instead of ~45 small ops). The CPU keeps HF's flat top-k (exact HF tie
    order) and torch ops."""
    return tensor.is_cuda


def _eos_on(device: torch.device, rule: StopRule) -> torch.Tensor:
    """The EOS ids as a device tensor, made once per (ids, device)."""
    key = (tuple(rule.eos_token_ids), device)
    if key not in _eos_tensors:
        _eos_tensors[key] = to_device(list(key[0]), device, torch.int64)
    return _eos_tensors[key]


# ------------------------------------------------------------------ float32 arithmetic on the host
F32_OVERFLOW = 2.0**128 - 2.0**103  # halfway between float32's largest value and 2**128: rounds to inf


@lru_cache(maxsize=64)
def _f32_struct(count: int) -> struct.Struct:
    return struct.Struct(f"{count}f")


def to_f32(values: list[float]) -> list[float]:
    """Each value rounded to the nearest float32 (overflow to +-inf), as a float32 tensor stores it."""
    packer = _f32_struct(len(values))
    try:
        return list(packer.unpack(packer.pack(*values)))
    except OverflowError:  # struct refuses values that round beyond float32's range
        return [math.copysign(math.inf, x) if abs(x) >= F32_OVERFLOW else to_f32([x])[0] for x in values]


def neg_if(flag: bool) -> float:
    """HF's `flag.to(float32) * NEG`: NEG, or -0.0 (whose sum with x is x, signed zeros included)."""
    return NEG if flag else -0.0


def divide_f32(values: list[float], divisor: float) -> list[float]:
    """float32 `values / divisor` (all float32 values), with IEEE results for a zero divisor."""
    if divisor != 0.0:
        return to_f32([x / divisor for x in values])
    sign = math.copysign(1.0, divisor)
    return [math.nan if x == 0.0 or x != x else math.copysign(math.inf, x) * sign for x in values]


def min_f32(values: list[float]) -> float:
    """`torch.min`: NaN if any value is NaN."""
    low = min(values)
    return math.nan if any(v != v for v in values) else low


def topk_indices(values: list[float], k: int) -> list[int]:
    """The indices `torch.topk(torch.tensor([values]), k)` gives on the CPU, largest first.

    When the k largest values and the next one are all distinct (and none is NaN) the answer is
    unique and a sort gives it; otherwise (ties, which torch breaks its own way) torch answers.
    Its CPU top-k only compares values, so its answer depends only on their order pattern (the
    dense ranks): asked once per pattern. Beam search meets the same few patterns of ties (its
    unfinished hypotheses' placeholder scores) at nearly every step."""
    order = sorted(range(len(values)), key=values.__getitem__, reverse=True)
    head = [values[i] for i in order[: k + 1]]
    total = sum(values)
    if total != total:  # NaN: its own place in torch's order
        return torch.topk(torch.frombuffer(array("f", values), dtype=torch.float32), k).indices.tolist()
    if all(a > b for a, b in zip(head, head[1:])):
        return order[:k]
    rank = {value: r for r, value in enumerate(sorted(set(values)))}
    return list(_torch_topk_of_pattern(tuple(rank[v] for v in values), k))


@lru_cache(maxsize=4096)
def _torch_topk_of_pattern(ranks: tuple[int, ...], k: int) -> tuple[int, ...]:
    return tuple(torch.topk(torch.tensor(ranks, dtype=torch.float32), k).indices.tolist())


def top_candidates(log_probs: torch.Tensor, running: torch.Tensor, num_requests: int, keep: int,
                   per_row_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each request's `keep` best scores `log_probs + running[:, None]` over its rows (each request
    owns consecutive rows), with their flat indices `row_in_request * V + token`, as HF's
    `topk(scores.view(batch, k * V), keep)` gives them.

    `per_row_first`: take each row's best `keep` tokens first and the request's best `keep` among
    those (a row's candidates that can make the request's top `keep` are among its own best
    `keep`, since adding the row's running score keeps their order). Same values and indices but
    for the order of exact ties, and on a GPU one radix-select pass over k x V values becomes one
    per row of V: used on CUDA, where tie order is the kernel's own anyway."""
    rows, vocab = log_probs.shape
    if not per_row_first:
        return torch.topk((log_probs + running[:, None]).reshape(num_requests, -1), k=keep)
    row_values, row_tokens = torch.topk(log_probs, k=min(keep, vocab), dim=-1)
    scores = (row_values + running[:, None]).reshape(num_requests, -1)
    values, positions = torch.topk(scores, k=keep)
    beams = torch.div(positions, row_values.shape[1], rounding_mode="floor")
    tokens = row_tokens.reshape(num_requests, -1).gather(1, positions)
    return values, beams * vocab + tokens


class BeamRequest(Request):
    """One prompt's beam search. Its scores live on the host as Python floats that are always
    float32 values, and every operation on them rounds to float32 as torch does (see `_select`)."""

    def __init__(self, prompt: list[int], strategy: "BeamSearch"):
        super().__init__(prompt)
        self.strategy = strategy
        self.rule: StopRule = strategy.stop_rule()
        k = strategy.num_beams
        self.num_beams = k
        self.beams_to_keep = max(2, 1 + len(self.rule.eos_token_ids)) * k
        self.vocab = 0  # set by the first step_device
        self.running_scores: list[float] = [0.0] + [NEG] * (k - 1)
        self.running_generated: list[list[int]] = [[] for _ in range(k)]
        self.finished_scores: list[float] = [NEG] * k
        self.finished_generated: list[list[int]] = [[] for _ in range(k)]
        self.finished_reasons: list[str] = ["length"] * k
        self.is_finished: list[bool] = [False] * k
        self.heuristic_unsatisfied = True
        self.num_generated = 0
        # Launched ahead (see `decode_ahead`): the reserved last blocks of the step in flight, and
        # the running scores its device part starts from (a tensor shared by the group, and the
        # offset of this request's k scores in it).
        self.ahead_tails: list[int] | None = None
        self.device_running: tuple[torch.Tensor, int] | None = None

    fills_pending_tokens = False  # its steps launched ahead feed known tokens (`decode_ahead`)

    def can_look_ahead(self) -> bool:
        # The penalty and stop strings need each beam's tokens on the host; the step ahead must
        # still be needed (a step that reaches max_new_tokens finishes the search).
        s = self.strategy
        return (s.repetition_penalty == 1.0 and not self.rule.stop_strings and not self.done
                and self.num_generated + self.steps_in_flight < self.rule.max_new_tokens)

    def begin(self, engine: Engine, table) -> None:
        # k rows over the one table (scores 0, NEG, ...): the first step's survivors fork it
        self.pending = [Branch(table, -1) for _ in range(self.num_beams)]

    def step(self, engine: Engine, logits: torch.Tensor) -> None:
        self.step_host(engine, self.step_device(logits).tolist())

    def step_device(self, logits: torch.Tensor) -> torch.Tensor:
        """The part of a step that reads the logits [k, V], on their device and without a host
        sync: log_softmax, processors, running scores, top-K. Returns [2K] float64: the top-K
        scores then their flat indices (exact in float64), for one batched transfer."""
        return BeamRequest.step_device_group([self], logits)[0]

    @staticmethod
    def step_device_group(requests: list["BeamRequest"], logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """`step_device` of several requests of one strategy whose k rows each are consecutive in
        `logits`: one log_softmax, processor pass and top-K over all rows. Every op is row-wise (the
        top-K is per request, over its k x V scores, as HF's batched beam search does), so each
        request gets the same numbers as alone, with a handful of kernels instead of a handful
        per request. Returns one flat tensor (the requests' results one after another) and their sizes."""
        first = requests[0]
        s, rule, k = first.strategy, first.rule, first.num_beams
        if logits.shape[0] != k * len(requests):
            raise ValueError(f"step_device_group got {logits.shape[0]} rows for {len(requests)} requests "
                             f"of {k} beams")
        vocab = logits.shape[-1]
        log_probs = torch.nn.functional.log_softmax(logits.float(), dim=-1)
        if s.repetition_penalty != 1.0:
            histories = [r.prompt + g for r in requests for g in r.running_generated]
            log_probs = apply_repetition_penalty(log_probs, histories, s.repetition_penalty)
        banned = [rule.bans_eos(r.num_generated + r.steps_in_flight) for r in requests]
        if any(banned):
            rows = None if all(banned) else \
                upload([flag for flag in banned for _ in range(k)], log_probs.device, torch.bool)
            log_probs = ban_tokens_(log_probs, rule.eos_token_ids, rows)  # log_probs is ours
        running = BeamRequest._running_scores(requests, log_probs.device)
        keep = first.beams_to_keep
        for request in requests:
            request.vocab = vocab
        if _on_kernels(log_probs) and keep <= vocab:
            # each row's best `keep`, then one launch for the rest (`kernels/beam_select.py`)
            from sharedecode.kernels import beam_select

            if k * keep <= beam_select.MAX_CANDIDATES:
                row_values, row_tokens = torch.topk(log_probs, k=keep, dim=-1)
                flat = beam_select.beam_candidates(row_values, row_tokens, running,
                                                   _eos_on(log_probs.device, rule), vocab, k)
                return flat.reshape(-1), [flat.shape[1]] * len(requests)
        topk_log_probs, topk_indices = top_candidates(log_probs, running, len(requests), keep,
                                                      per_row_first=log_probs.is_cuda)
        parts = [topk_log_probs.double(), topk_indices.double()]
        if first.strategy.engine.look_ahead and all(r.can_look_ahead() for r in requests):
            parts += BeamRequest._device_choice(topk_log_probs, topk_indices, vocab, rule.eos_token_ids, k)
        flat = torch.cat(parts, dim=1)
        return flat.reshape(-1), [flat.shape[1]] * len(requests)

    @staticmethod
    def _running_scores(requests: list["BeamRequest"], device: torch.device) -> torch.Tensor:
        """The requests' running scores [R * k] on the device: from the host, or, for a step
        launched ahead, the scores its previous step's device choice kept."""
        held = [r.device_running for r in requests]
        for request in requests:
            request.device_running = None
        if all(h is None for h in held):
            return upload([x for r in requests for x in r.running_scores], device, torch.float32)
        if any(h is None for h in held):  # (decode_ahead sets them for every request of its step)
            raise RuntimeError("a step mixes beam requests launched ahead with ones that were not")
        scores, _ = held[0]
        k = requests[0].num_beams
        if all(h[0] is scores for h in held) and [h[1] for h in held] == \
                list(range(0, k * len(requests), k)) and scores.numel() == k * len(requests):
            return scores
        index = upload([h[1] + j for h in held for j in range(k)], device, torch.int64)
        return scores.index_select(0, index)

    @staticmethod
    def _device_choice(values: torch.Tensor, indices: torch.Tensor, vocab: int, eos: list[int],
                       k: int) -> list[torch.Tensor]:
        """HF's choice of the beams that keep running, on the device: the best k candidates after
        those ending in EOS are pushed down by NEG (float32, as HF adds them). Returns [R, k] each:
        the chosen candidates' positions among the top-K, and their running scores (float64)."""
        running = values
        if eos:
            ends = torch.zeros_like(values)
            for token in eos:  # (a column at a time: no sync, no index tensor)
                ends += (torch.remainder(indices, vocab) == token).to(values.dtype)
            running = values + ends.clamp_(max=1.0) * NEG
        kept, chosen = torch.topk(running, k, dim=1)
        return [chosen.double(), kept.double()]

    def step_host(self, engine: Engine, top: list[float], rows=None) -> None:
        """The rest of the step, on `step_device`'s result moved to the host (as a list). (`rows`:
        the branches as launched; a beam request's rows are always its k pending beams.)"""
        if self.ahead_tails is not None:
            self._step_launched_ahead(engine, top)
        else:
            self._step_tables(engine, [b.table for b in self.pending], top)

    def _step_launched_ahead(self, engine: Engine, top: list[float]) -> None:
        """`step_host` while the next step is already on the device (`decode_ahead`): each
        survivor's table is made as the device made it, its parent's full blocks and its reserved
        block. As in `_step_tables`, a parent's first survivor continues in the parent's table
        (`take_tail`: its full blocks stay put), further survivors turn a parent without survivors
        into a sibling (`fork_into`, then `take_tail`) or fork (`fork_with_tail`) first, while
        their parent is still whole; parents left over and reserved blocks not handed over are
        freed (all of them when the search is done or an exception interrupts)."""
        allocator = engine.allocator
        parents = [b.table for b in self.pending]
        tails, self.ahead_tails = self.ahead_tails, None
        made: list = []
        finished = False
        try:
            survivors = self._select(top)
            first: dict[int, int] = {}  # parent table -> its first survivor
            for i, (beam, _) in enumerate(survivors):
                first.setdefault(id(parents[beam]), i)
            losers = list({id(t): t for t in parents if id(t) not in first}.values())
            made = [None] * len(survivors)
            for i, (beam, token) in enumerate(survivors):  # further survivors, from whole parents
                if first[id(parents[beam])] != i:
                    if losers:
                        table = losers.pop(0)
                        allocator.fork_into(table, parents[beam])
                        allocator.take_tail(table, tails[i], token)
                    else:
                        table = allocator.fork_with_tail(parents[beam], tails[i], token)
                    made[i] = table
            for i, (beam, token) in enumerate(survivors):
                if first[id(parents[beam])] == i:
                    allocator.take_tail(parents[beam], tails[i], token)
                    made[i] = parents[beam]
            self.pending = [Branch(table, PENDING_TOKEN) for table in made]
            allocator.mark_all_computed(made)  # (written by the step in flight)
            finished = True
        finally:
            kept = {id(t) for t in made if t is not None} if finished else set()
            allocator.unreserve([tail for tail in tails if tail in allocator.reserved])
            for table in parents + [t for t in made if t is not None]:
                if id(table) not in kept:
                    engine.free(table)
            if not finished:
                self.pending = []

    def release(self, engine: Engine) -> None:
        super().release(engine)
        if self.ahead_tails is not None:
            engine.allocator.unreserve(self.ahead_tails)
            self.ahead_tails = None
        self.device_running = None

    @classmethod
    def decode_ahead(cls, engine: Engine, requests: list["BeamRequest"], step: LaunchedStep) -> torch.Tensor | None:
        """Launch the step after `step` before its results reach the host: the survivors that
        `step`'s device part chose (HF's running choice: `beam_select.beam_candidates` on CUDA,
        `_device_choice` elsewhere) feed their tokens, their block tables are
        made on the device from `step`'s rows (`Engine.decode_forked`: the parent's full blocks,
        then a reserved block holding a copy of the parent's partial one), and their running
        scores stay on the device for this step's own device part. The host catches up in
        `_step_launched_ahead`; a search found done there discards this step's rows. None (nothing
        launched) when the requests do not form one group with the choice in `step`'s results, or
        the reserved blocks do not fit."""
        from sharedecode.kernels import beam_select

        first = requests[0]
        k, keep = first.num_beams, first.beams_to_keep
        launched = step.requests
        if step.flat is None or any(type(r) is not BeamRequest or r.strategy is not first.strategy
                                    for r in launched) or step.flat.numel() != (2 * keep + 2 * k) * len(launched):
            return None
        bs = engine.block_size
        n = k * len(requests)
        try:
            tails = engine.allocator.reserve(n)
        except KVCacheFull:
            return None
        try:
            where = {id(r): i for i, r in enumerate(launched)}
            order = [where[id(r)] for r in requests]
            positions = [r.pending[0].table.num_tokens for r in requests for _ in range(k)]
            columns = [p // bs for p in positions]
            copy = [int(p % bs != 0) for p in positions]
            previous = engine.last_block_tables
            width = max(previous.shape[1], max(columns) + 1)
            meta = upload(order + columns + tails + copy, step.flat.device, torch.int32)
            fork = beam_select.fork_beam_rows if _on_kernels(step.flat) else beam_select.fork_beam_rows_torch
            rows, copy_src, tokens, running = fork(step.flat.view(len(launched), -1), meta[: len(order)],
                                                   previous, *meta[len(order):].view(3, n), first.vocab, k, width)
            logits = engine.decode_forked(rows, copy_src, positions, tails, tokens,
                                          BeamRequest._ahead_groups(engine, requests),
                                          reuse_output=True)  # read by step_device_group at once
        except BaseException:
            engine.allocator.unreserve(tails)
            raise
        for i, request in enumerate(requests):
            request.ahead_tails = tails[i * k : (i + 1) * k]
            request.device_running = (running, i * k)
        return logits

    @staticmethod
    def _ahead_groups(engine: Engine, requests: list["BeamRequest"]) -> list:
        """Shared-prefix groups for a step launched ahead, from the beams' current tables: a group
        that holds whole requests stays valid for their survivors (each holds its parent's full
        blocks), with their rows in the same places; a group that splits a request is left out."""
        if not engine.shared_prefix:
            return []
        from sharedecode.kernels.shared_prefix import group_shared_prefixes

        k = requests[0].num_beams
        tables = [b.table for r in requests for b in r.pending]
        groups = group_shared_prefixes([t.block_ids for t in tables], [t.num_tokens for t in tables],
                                       engine.block_size)
        return [(members, shared) for members, shared in groups
                if len(members) == k * len({m // k for m in members})]

    def _step_tables(self, engine: Engine, parents: list, top: list[float]) -> None:
        """Select from `top` and branch the survivors out of `parents` (the tables of the rows the
        scores came from; one table may stand for several rows). Each parent's first survivor
        takes over its table; the others fork it, each reusing the table of a parent without
        survivors while there is one (`fork_into`: only their differing blocks change hands);
        the parents left over are freed at once, and so is every parent not handed over when an
        exception interrupts."""
        handed: set[int] = set()
        try:
            survivors = self._select(top)
            firsts = {id(parents[beam]) for beam, _ in survivors}
            losers = list({id(t): t for t in parents if id(t) not in firsts}.values())
            self.pending = []
            for beam, token in survivors:  # one by one, so that an interruption frees what exists
                parent = parents[beam]
                if id(parent) not in handed:
                    self.pending.append(Branch(parent, token))
                    handed.add(id(parent))
                elif losers:  # in the parents' order, so blocks are freed in the same order
                    table = losers.pop(0)
                    engine.fork_into(table, parent)
                    handed.add(id(table))
                    self.pending.append(Branch(table, token))
                else:
                    self.pending.append(Branch(engine.fork(parent), token))
        finally:
            for table in parents:
                if id(table) not in handed:
                    engine.free(table)

    def _select(self, top: list[float]) -> list[tuple[int, int]]:
        """HF's beam step on the top-K candidates; returns the survivors (parent beam, token), none
        when the search is done.

        The same float32 operations as HF's tensors, one list element at a time: each result is
        rounded to float32 (`to_f32`; a float32 sum or quotient computed in double and rounded once
        is the correctly rounded float32 result), and each top-k is `topk_indices` (torch's answer,
        ties included). Plain Python on these few numbers costs far less than ~30 tiny torch ops."""
        s, k, keep = self.strategy, self.num_beams, self.beams_to_keep
        scores = top[:keep]  # float32 values (exact in float64)
        beam_of, token_of = zip(*(divmod(int(i), self.vocab) for i in top[keep : 2 * keep]))
        generated = self.running_generated
        reasons = self._finish_reasons(beam_of, token_of)
        hits = [r is not None for r in reasons]

        # The best num_beams unfinished candidates keep running (x + -0.0 is x: nothing to round
        # when no candidate finished).
        running = to_f32([x + neg_if(h) for x, h in zip(scores, hits)]) if any(hits) else scores
        if len(top) > 2 * keep:  # the device made this choice (`_device_choice`): the same one
            next_indices = [int(i) for i in top[2 * keep : 2 * keep + k]]
        else:
            next_indices = topk_indices(running, k)

        # Finished candidates among the top num_beams compete with earlier finished beams.
        did_finish = [h and rank < k for rank, h in enumerate(hits)]
        adjusted = divide_f32(scores, to_f32([(self.num_generated + 1) ** s.length_penalty])[0])
        full = all(self.is_finished) and s.early_stopping is True
        for flag in (full, not self.heuristic_unsatisfied):
            if flag:  # (adding -0.0 when it is False changes nothing)
                adjusted = to_f32([x + NEG for x in adjusted])
        adjusted = to_f32([x + neg_if(not d) for x, d in zip(adjusted, did_finish)])
        merged = self.finished_scores + adjusted
        kept = topk_indices(merged, k)
        old = len(self.finished_scores)

        def merged_entry(i: int) -> tuple[list[int], str, bool]:
            if i < old:
                return self.finished_generated[i], self.finished_reasons[i], self.is_finished[i]
            j = i - old
            return generated[beam_of[j]] + [token_of[j]], reasons[j] or "length", did_finish[j]

        entries = [merged_entry(i) for i in kept]
        self.finished_scores = [merged[i] for i in kept]
        self.finished_generated = [e[0] for e in entries]
        self.finished_reasons = [e[1] for e in entries]
        self.is_finished = [e[2] for e in entries]

        self.num_generated += 1
        self.running_scores = [running[i] for i in next_indices]
        self._update_heuristic()
        go_on = (self.heuristic_unsatisfied
                 and not (all(self.is_finished) and s.early_stopping is True)
                 and not all(hits))
        if not go_on:
            self.done = True
            return []
        self.running_generated = [generated[beam_of[i]] + [token_of[i]] for i in next_indices]
        return [(beam_of[i], token_of[i]) for i in next_indices]

    def _finish_reasons(self, beam_of: tuple[int, ...], token_of: tuple[int, ...]) -> list[str | None]:
        """Each candidate's `StopRule.finish_reason` (every beam holds num_generated tokens)."""
        rule = self.rule
        if rule.stop_strings:
            return [rule.finish_reason(self.running_generated[b] + [t]) for b, t in zip(beam_of, token_of)]
        at_limit = "length" if self.num_generated + 1 >= rule.max_new_tokens else None
        eos = rule.eos_token_ids
        return ["eos" if t in eos else at_limit for t in token_of]

    def _update_heuristic(self) -> None:
        s = self.strategy
        if s.early_stopping == "never" and s.length_penalty > 0.0:
            best_length = s.max_new_tokens
        else:
            best_length = self.num_generated
        divisor = to_f32([best_length ** s.length_penalty])[0]
        best_possible = divide_f32(self.running_scores[:1], divisor)[0]
        worst = min_f32(self.finished_scores)
        self.heuristic_unsatisfied = self.heuristic_unsatisfied and any(
            best_possible > (worst if finished else NEG) for finished in self.is_finished)

    def snapshot(self) -> dict:
        """Current beams for live displays."""
        return {
            "prompt": self.prompt,
            "beams": [(list(g), sc) for g, sc in zip(self.running_generated, self.running_scores)]
            if not self.done else [],
            "finished": [(list(g), sc) for g, sc, f in
                         zip(self.finished_generated, self.finished_scores, self.is_finished) if f],
            "done": self.done,
        }

    def results(self) -> list[GeneratedSequence]:
        s = self.strategy
        out = []
        for i in range(s.num_return_sequences):
            generated = self.finished_generated[i]
            score = self.finished_scores[i]
            logprob = score * (len(generated) ** s.length_penalty) if generated else 0.0
            text = s.decode_text(generated)
            reason = self.finished_reasons[i]
            if reason == "stop" and text is not None:
                index = self.rule.stop_index(generated)
                full = s.tokenizer.decode(generated)
                text = full[:index] if index is not None else text
            out.append(GeneratedSequence(generated, text, score, logprob, reason))
        return out


class BeamSearch(Strategy):
    """`BeamSearch(model).run(prompt)`: HF beam search (`num_beams`, `length_penalty`,
    `early_stopping` True / False / "never", `num_return_sequences`) on a copy-on-write cache.
    `num_beam_groups > 1` runs diverse (group) beam search as transformers v4 did, with
    `diversity_penalty` subtracted per use of a token by an earlier group at the same step."""

    def __init__(self, model_or_engine, tokenizer=None, *, num_beams: int = 4,
                 max_new_tokens: int | None = None, min_new_tokens: int = 0, length_penalty: float = 1.0,
                 early_stopping: bool | str = False, num_return_sequences: int = 1,
                 eos_token_id: int | list[int] | None = None, stop: str | list[str] | None = None,
                 repetition_penalty: float = 1.0, num_beam_groups: int = 1, diversity_penalty: float = 0.0,
                 truncate_prompt: bool = False):
        self.num_beams = check_int("num_beams", num_beams, 1)
        self.num_return_sequences = check_int("num_return_sequences", num_return_sequences, 1)
        if self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences must be <= num_beams ({num_beams}), "
                             f"got {num_return_sequences}")
        # |length_penalty| <= 100 keeps (tokens ** length_penalty) finite for any length.
        self.length_penalty = check_float("length_penalty", length_penalty, -100.0, 100.0)
        if not (early_stopping is True or early_stopping is False or
                (isinstance(early_stopping, str) and early_stopping == "never")):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        self.early_stopping = early_stopping
        self.repetition_penalty = check_float("repetition_penalty", repetition_penalty, 0.0, float("inf"),
                                              low_open=True, high_open=True)
        self.num_beam_groups = check_int("num_beam_groups", num_beam_groups, 1, self.num_beams)
        if self.num_beams % self.num_beam_groups:
            raise ValueError(f"num_beams ({num_beams}) must be divisible by num_beam_groups ({num_beam_groups})")
        self.diversity_penalty = check_float("diversity_penalty", diversity_penalty, 0.0, float("inf"),
                                             high_open=True)
        super().__init__(model_or_engine, tokenizer, max_new_tokens=max_new_tokens,
                         min_new_tokens=min_new_tokens, eos_token_id=eos_token_id, stop=stop,
                         truncate_prompt=truncate_prompt)

    def make_request(self, prompt_ids: list[int]) -> Request:
        if self.num_beams == 1:  # HF runs num_beams=1 as greedy search
            from sharedecode.strategies.sampling import Greedy

            greedy = Greedy(self.engine, max_new_tokens=self.max_new_tokens,
                            min_new_tokens=self.min_new_tokens, repetition_penalty=self.repetition_penalty,
                            eos_token_id=self.eos_token_ids, stop=self.stop_strings or None)
            return greedy.make_request(prompt_ids)
        if self.num_beam_groups > 1:
            return DiverseBeamRequest(prompt_ids, self)
        return BeamRequest(prompt_ids, self)
