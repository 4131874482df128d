"""Diverse (group) beam search on forked block tables.

The algorithm is transformers v4's `GenerationMixin._group_beam_search` with its `BeamSearchScorer`
(num_beam_groups > 1) and `HammingDiversityLogitsProcessor` (Vijayakumar et al. 2016,
arXiv 1610.02424), removed from transformers' core in v5:

- `num_beams` beams are split into `num_beam_groups` groups of `group_size` beams. Every group starts
  from the prompt with only its first beam alive (score 0, the others -1e9).
- Each step the groups choose in order. Group g's next-token log-probs are lowered by
  `diversity_penalty * count(token)`, counting the tokens the groups before it chose *at this step*;
  then the repetition penalty and the min-new-tokens EOS ban apply, the running scores are added, and
  the top `max(2, 1 + n_eos) * group_size` candidates over the group's `group_size * vocab` are ranked.
- Walking the candidates in rank order, an EOS (or stop string) candidate ranked within the first
  `group_size` becomes a finished hypothesis of that group (score = sum_logprobs /
  generated_len ** length_penalty); other candidates become the group's next beams until it has
  `group_size` of them.
- Each group keeps its own `BeamHypotheses` (the best `group_size`) and is done by the same rule as
  v4: `early_stopping=True` as soon as it holds `group_size` hypotheses; `False` when its worst
  hypothesis beats the best candidate score over the current length; `"never"` the same over
  max_new_tokens when length_penalty > 0. A done group stops (its blocks are freed at once).
- The search ends when every group is done or at max_new_tokens; then every group not done adds its
  running beams, and the `num_return_sequences` best hypotheses over all groups are returned.

Departures from v4, both invisible unless they would change nothing useful: a group that is done
contributes no tokens to the diversity counts (v4 kept feeding it padding tokens, which then counted
as "chosen" and penalised the pad token in later groups), and a sequence ending in EOS keeps the EOS
that fired (v4 wrote `eos_token_id[0]`).
"""

from __future__ import annotations

import torch

from sharedecode.engine import Engine
from sharedecode.results import GeneratedSequence
from sharedecode.sampling import apply_repetition_penalty, ban_tokens
from sharedecode.scheduler import Branch, Request

NEG = -1.0e9


class BeamHypotheses:
    """The best `num_beams` finished hypotheses of one group (transformers v4 semantics)."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool | str,
                 max_new_tokens: int):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_new_tokens = max_new_tokens
        self.beams: list[tuple[float, list[int], str]] = []  # (score, generated tokens, finish reason)
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, tokens: list[int], sum_logprobs: float, reason: str) -> None:
        score = sum_logprobs / (len(tokens) ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens, reason))
            if len(self) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, num_generated: int) -> bool:
        if len(self) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_new_tokens
        else:
            length = num_generated
        return self.worst_score >= best_sum_logprobs / length ** self.length_penalty


class DiverseBeamRequest(Request):
    def __init__(self, prompt: list[int], strategy):
        super().__init__(prompt)
        self.strategy = strategy
        self.rule = strategy.stop_rule()
        self.num_groups = strategy.num_beam_groups
        self.group_size = strategy.num_beams // self.num_groups
        self.candidates_per_group = max(2, 1 + len(self.rule.eos_token_ids)) * self.group_size
        g, gs = self.num_groups, self.group_size
        self.running_scores = [torch.full((gs,), NEG) for _ in range(g)]
        for scores in self.running_scores:
            scores[0] = 0.0
        self.running_generated: list[list[list[int]]] = [[[] for _ in range(gs)] for _ in range(g)]
        self.hypotheses = [BeamHypotheses(gs, strategy.length_penalty, strategy.early_stopping,
                                          strategy.max_new_tokens) for _ in range(g)]
        self.group_done = [False] * g
        self.num_generated = 0
        self.best: list[tuple[float, list[int], str]] = []

    # The pending branches are the beams of the groups not done, group after group.
    def _live_groups(self) -> list[int]:
        return [g for g in range(self.num_groups) if not self.group_done[g]]

    def start(self, engine: Engine, table, logits: torch.Tensor) -> None:
        parents = [[table] * self.group_size for _ in range(self.num_groups)]
        rows = logits.unsqueeze(0).expand(self.group_size, -1)
        try:
            self._select(engine, parents, [rows] * self.num_groups)
        finally:
            engine.free(table)

    def step(self, engine: Engine, logits: torch.Tensor) -> None:
        tables = [b.table for b in self.pending]
        live = self._live_groups()
        gs = self.group_size
        parents = [None] * self.num_groups
        rows = [None] * self.num_groups
        for i, g in enumerate(live):
            parents[g] = tables[i * gs:(i + 1) * gs]
            rows[g] = logits[i * gs:(i + 1) * gs]
        try:
            self._select(engine, parents, rows)
        finally:  # pruned beams give their blocks back at once
            for table in tables:
                engine.free(table)

    def _select(self, engine: Engine, parents: list, rows: list) -> None:
        s, rule, gs = self.strategy, self.rule, self.group_size
        chosen_this_step: list[int] = []  # tokens picked by earlier groups at this step
        next_pending: list[Branch] = []
        new_beams: dict[int, list[tuple[int, int]]] = {}  # group -> [(parent beam, token)]
        for g in self._live_groups():
            log_probs = torch.nn.functional.log_softmax(rows[g].float().cpu(), dim=-1)
            vocab = log_probs.shape[-1]
            if s.diversity_penalty > 0.0 and chosen_this_step:
                counts = torch.bincount(torch.tensor(chosen_this_step), minlength=vocab)
                log_probs = log_probs - s.diversity_penalty * counts
            if s.repetition_penalty != 1.0:
                log_probs = apply_repetition_penalty(
                    log_probs, [self.prompt + t for t in self.running_generated[g]], s.repetition_penalty)
            if rule.bans_eos(self.num_generated):
                log_probs = ban_tokens(log_probs, rule.eos_token_ids)
            scores = (log_probs + self.running_scores[g][:, None]).reshape(1, -1)
            top_scores, top_indices = torch.topk(scores, self.candidates_per_group, dim=1, largest=True,
                                                 sorted=True)
            beams: list[tuple[int, int]] = []
            beam_scores: list[float] = []
            for rank, (score, index) in enumerate(zip(top_scores[0].tolist(), top_indices[0].tolist())):
                beam, token = divmod(index, vocab)
                tokens = self.running_generated[g][beam] + [token]
                reason = rule.finish_reason(tokens)
                if reason in ("eos", "stop"):
                    if rank >= gs:
                        continue
                    self.hypotheses[g].add(tokens, score, reason)
                else:
                    beams.append((beam, token))
                    beam_scores.append(score)
                if len(beams) == gs:
                    break
            self.group_done[g] = self.hypotheses[g].is_done(float(top_scores[0].max()),
                                                            self.num_generated + 1)
            self.running_scores[g] = top_scores.new_tensor(beam_scores)
            self.running_generated[g] = [self.running_generated[g][b] + [t] for b, t in beams]
            chosen_this_step.extend(t for _, t in beams)
            new_beams[g] = beams
        self.num_generated += 1

        if all(self.group_done) or self.num_generated >= s.max_new_tokens:
            self._finalize()
            return
        # Survivors of the groups still searching fork from their parents; the caller frees those.
        for g in self._live_groups():
            for beam, token in new_beams[g]:
                next_pending.append(Branch(engine.fork(parents[g][beam]), token))
        self.pending = next_pending

    def _finalize(self) -> None:
        for g in self._live_groups():
            for tokens, score in zip(self.running_generated[g], self.running_scores[g].tolist()):
                self.hypotheses[g].add(tokens, score, "length")
        candidates = [h for hyps in self.hypotheses for h in hyps.beams]
        ranked = sorted(candidates, key=lambda h: h[0])  # v4: stable sort, best popped from the end
        self.best = [ranked.pop() for _ in range(min(self.strategy.num_return_sequences, len(ranked)))]
        self.pending = []
        self.done = True

    def snapshot(self) -> dict:
        beams = []
        if not self.done:
            for g in self._live_groups():
                beams += [(list(t), float(sc)) for t, sc in
                          zip(self.running_generated[g], self.running_scores[g].tolist())]
        return {
            "prompt": self.prompt,
            "beams": beams,
            "finished": [(list(t), float(sc)) for hyps in self.hypotheses for sc, t, _ in hyps.beams],
            "done": self.done,
        }

    def results(self) -> list[GeneratedSequence]:
        s = self.strategy
        out = []
        for score, generated, reason in self.best:
            logprob = score * (len(generated) ** s.length_penalty)
            text = s.decode_text(generated)
            if reason == "stop" and text is not None:
                index = self.rule.stop_index(generated)
                text = s.tokenizer.decode(generated)[:index] if index is not None else text
            out.append(GeneratedSequence(list(generated), text, float(score), logprob, reason))
        return out
