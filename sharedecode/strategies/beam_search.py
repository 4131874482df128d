"""Beam search with Hugging Face's exact semantics, on forked block tables.

The arithmetic follows transformers' `GenerationMixin._beam_search` step for step (same tensors,
same order of float operations, same top-k tie-breaking), so tokens and `sequences_scores` match
`model.generate(num_beams=k, do_sample=False)`. What differs is the memory: the prompt is prefilled
once, each surviving beam is a fork of its parent's block table (ref counts, no copy), losers are
freed at once, and only a beam that appends into a still-shared partial block copies it.
"""

from __future__ import annotations

import torch

from sharedecode.engine import Engine
from sharedecode.results import GeneratedSequence
from sharedecode.sampling import apply_repetition_penalty, ban_tokens, to_device
from sharedecode.scheduler import Branch, Request
from sharedecode.strategies.base import StopRule, Strategy, check_float, check_int
from sharedecode.strategies.diverse_beam_search import DiverseBeamRequest

NEG = -1.0e9  # HF's "impossible" score


class BeamRequest(Request):
    def __init__(self, prompt: list[int], strategy: "BeamSearch"):
        super().__init__(prompt)
        self.strategy = strategy
        self.rule: StopRule = strategy.stop_rule()
        k = strategy.num_beams
        self.num_beams = k
        self.beams_to_keep = max(2, 1 + len(self.rule.eos_token_ids)) * k
        self.top_num_beam_mask = torch.cat((torch.ones(k, dtype=torch.bool),
                                            torch.zeros(self.beams_to_keep - k, dtype=torch.bool)))
        self.running_scores = torch.zeros(k)
        self.running_scores[1:] = NEG
        self.running_generated: list[list[int]] = [[] for _ in range(k)]
        self.finished_scores = torch.full((k,), NEG)
        self.finished_generated: list[list[int]] = [[] for _ in range(k)]
        self.finished_reasons: list[str] = ["length"] * k
        self.is_finished = torch.zeros(k, dtype=torch.bool)
        self.heuristic_unsatisfied = True
        self.num_generated = 0

    def start(self, engine: Engine, table, logits: torch.Tensor) -> None:
        k = self.num_beams
        try:
            top = self.step_device(logits.unsqueeze(0).expand(k, -1)).cpu()
            self._select(engine, [table] * k, top)
        finally:
            engine.free(table)

    def step(self, engine: Engine, logits: torch.Tensor) -> None:
        self.step_host(engine, self.step_device(logits).cpu())

    def step_device(self, logits: torch.Tensor) -> torch.Tensor:
        """The part of a step that reads the logits [k, V], on their device and without a host
        sync: log_softmax, processors, running scores, top-K. Returns [2K] float64: the top-K
        scores then their flat indices (exact in float64), for one batched transfer."""
        s, rule = self.strategy, self.rule
        self.vocab = logits.shape[-1]
        log_probs = torch.nn.functional.log_softmax(logits.float(), dim=-1)
        if s.repetition_penalty != 1.0:
            log_probs = apply_repetition_penalty(
                log_probs, [self.prompt + g for g in self.running_generated], s.repetition_penalty)
        if rule.bans_eos(self.num_generated):
            log_probs = ban_tokens(log_probs, rule.eos_token_ids)
        running = to_device(self.running_scores, log_probs.device)
        log_probs = (log_probs + running[:, None]).reshape(1, -1)
        topk_log_probs, topk_indices = torch.topk(log_probs, k=self.beams_to_keep)
        return torch.cat((topk_log_probs[0].double(), topk_indices[0].double()))

    def step_host(self, engine: Engine, top: torch.Tensor) -> None:
        """The rest of the step, on `step_device`'s result moved to the host."""
        parents = [b.table for b in self.pending]
        try:
            self._select(engine, parents, top)
        finally:  # pruned beams give their blocks back at once
            for table in parents:
                engine.free(table)

    def _select(self, engine: Engine, parents: list, top: torch.Tensor) -> None:
        s, rule, k, vocab = self.strategy, self.rule, self.num_beams, self.vocab
        topk_log_probs = top[None, : self.beams_to_keep].float()
        topk_indices = top[None, self.beams_to_keep :].long()
        beam_of = (topk_indices // vocab)[0].tolist()
        token_of = (topk_indices % vocab)[0].tolist()
        candidates = [self.running_generated[b] + [t] for b, t in zip(beam_of, token_of)]
        reasons = [rule.finish_reason(c) for c in candidates]
        hits = torch.tensor([[r is not None for r in reasons]])

        # The best num_beams unfinished candidates keep running.
        topk_running = topk_log_probs + hits.to(torch.float32) * NEG
        next_indices = torch.topk(topk_running, k=k)[1][0].tolist()
        new_scores = topk_running[0, next_indices]

        # Finished candidates among the top num_beams compete with earlier finished beams.
        did_finish = hits & self.top_num_beam_mask[None, :]
        adjusted = topk_log_probs / ((self.num_generated + 1) ** s.length_penalty)
        full = bool(self.is_finished.all()) and s.early_stopping is True
        adjusted = adjusted + torch.tensor([[full]]).to(torch.float32) * NEG
        adjusted = adjusted + torch.tensor([[not self.heuristic_unsatisfied]]).to(torch.float32) * NEG
        adjusted = adjusted + (~did_finish) * NEG
        merged_scores = torch.cat((self.finished_scores[None, :], adjusted), dim=1)
        merged_generated = self.finished_generated + candidates
        merged_reasons = self.finished_reasons + [r or "length" for r in reasons]
        merged_finished = torch.cat((self.is_finished[None, :], did_finish), dim=1)
        keep = torch.topk(merged_scores, k=k)[1][0]
        self.finished_scores = merged_scores[0, keep]
        self.finished_generated = [merged_generated[i] for i in keep.tolist()]
        self.finished_reasons = [merged_reasons[i] for i in keep.tolist()]
        self.is_finished = merged_finished[0, keep]

        self.num_generated += 1
        self.running_scores = new_scores
        self._update_heuristic()
        go_on = (self.heuristic_unsatisfied
                 and not (bool(self.is_finished.all()) and s.early_stopping is True)
                 and not bool(hits.all()))
        if not go_on:
            self.pending = []
            self.done = True
            return
        # Survivors fork from their parents; the caller frees the parents afterwards.
        self.running_generated = [candidates[i] for i in next_indices]
        self.pending = []
        for i in next_indices:  # appended one by one so that an interruption frees what exists
            self.pending.append(Branch(engine.fork(parents[beam_of[i]]), token_of[i]))

    def _update_heuristic(self) -> None:
        s = self.strategy
        if s.early_stopping == "never" and s.length_penalty > 0.0:
            best_length = s.max_new_tokens
        else:
            best_length = self.num_generated
        best_possible = self.running_scores[:1] / (best_length ** s.length_penalty)
        worst_finished = torch.where(self.is_finished, torch.min(self.finished_scores), -1.0e9)
        self.heuristic_unsatisfied = self.heuristic_unsatisfied and bool(
            torch.any(best_possible > worst_finished))

    def snapshot(self) -> dict:
        """Current beams for live displays."""
        return {
            "prompt": self.prompt,
            "beams": [(list(g), float(sc)) for g, sc in zip(self.running_generated, self.running_scores)]
            if not self.done else [],
            "finished": [(list(g), float(sc)) for g, sc, f in
                         zip(self.finished_generated, self.finished_scores, self.is_finished) if f],
            "done": self.done,
        }

    def results(self) -> list[GeneratedSequence]:
        s = self.strategy
        out = []
        for i in range(s.num_return_sequences):
            generated = self.finished_generated[i]
            score = float(self.finished_scores[i])
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
