"""Parallel sampling and greedy decoding: the prompt prefilled once, forked n ways."""

from __future__ import annotations

import torch

from sharedecode.engine import Engine
from sharedecode.results import GeneratedSequence
from sharedecode.sampling import SamplingParams, apply_repetition_penalty, ban_tokens, draw_tokens
from sharedecode.uploads import upload
from sharedecode.scheduler import Branch, Request
from sharedecode.strategies.base import Strategy, check_float, check_int


class SampleRequest(Request):
    def __init__(self, prompt: list[int], strategy: "ParallelSampling", seed: int | None):
        super().__init__(prompt)
        self.strategy = strategy
        self.rule = strategy.stop_rule()
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.generated: dict[int, list[int]] = {}  # by id(branch)
        self.logprobs: dict[int, float] = {}
        self.slots: dict[int, int] = {}  # by id(branch): its row of the request's noise draw
        self.num_generated = 0  # tokens each live branch holds (they all step together)
        self.finished: list[GeneratedSequence] = []

    def begin(self, engine: Engine, table) -> None:
        if self.seed is not None:
            self.generator = torch.Generator(device=engine.device).manual_seed(self.seed)
        self.pending = branches = [Branch(table, -1)]
        for _ in range(self.strategy.best_of - 1):  # one by one: an interruption frees what exists
            branches.append(Branch(engine.fork(table), -1))
        for slot, branch in enumerate(branches):
            self.generated[id(branch)] = []
            self.logprobs[id(branch)] = 0.0
            self.slots[id(branch)] = slot

    def can_look_ahead(self) -> bool:
        # the penalty needs every token on the host; the step ahead must still be needed
        return (self.strategy.params.repetition_penalty == 1.0 and not self.done
                and self.num_generated + self.steps_in_flight < self.rule.max_new_tokens)

    @staticmethod
    def chosen_tokens(results: torch.Tensor) -> torch.Tensor:
        return results.view(-1, 2)[:, 0].long()  # (token, logprob) pairs, exact in float64

    def step(self, engine: Engine, logits: torch.Tensor) -> None:
        self.step_host(engine, self.step_device(logits).tolist())

    def step_device(self, logits: torch.Tensor) -> torch.Tensor:
        """Choose each branch's next token on the logits' device without a host sync; returns [2n]
        float64: each branch's token and its log-probability, for one batched transfer."""
        return self.step_device_group([self], logits)[0]

    @staticmethod
    def step_device_group(requests: list["SampleRequest"], logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """`step_device` of several requests of one strategy whose rows are consecutive in
        `logits`: one pass of each processor over all rows (row-wise, so the same numbers).
        Returns one flat tensor, the requests' results one after another, and their sizes: no
        per-request tensor op, which costs more than the step itself with hundreds of requests."""
        s, rule = requests[0].strategy, requests[0].rule
        counts = [len(r.pending) for r in requests]
        scores = logits.float()
        if s.params.repetition_penalty != 1.0:
            histories = [r.prompt + r.generated[id(b)] for r in requests for b in r.pending]
            scores = apply_repetition_penalty(scores, histories, s.params.repetition_penalty)
        # (a step launched ahead counts the tokens of the steps before it not read yet)
        banned = [rule.bans_eos(r.num_generated + r.steps_in_flight) for r in requests]
        if any(banned):
            rows = upload([flag for flag, n in zip(banned, counts) for _ in range(n)], scores.device, torch.bool)
            scores = ban_tokens(scores, rule.eos_token_ids, rows) if not all(banned) else \
                ban_tokens(scores, rule.eos_token_ids)
        if s.params.temperature == 0.0:
            tokens = scores.argmax(dim=-1)
            chosen = torch.log_softmax(scores, dim=-1).gather(1, tokens[:, None])[:, 0]
        else:
            # Each request draws a row of noise for every branch it started with from its own
            # generator (seeded requests stay reproducible), so the draws do not depend on when a
            # sequence stopped or was seen to stop (a step launched ahead still has its row).
            noise = torch.cat([r._noise(scores.shape[-1], scores.device) for r in requests])
            tokens, chosen = draw_tokens(scores, noise, s.params)
        pairs = torch.stack((tokens.double(), chosen.double()), dim=1)  # [rows, 2], exact in float64
        return pairs.reshape(-1), [2 * n for n in counts]

    def _noise(self, vocab: int, device: torch.device) -> torch.Tensor:
        """Exp(1) noise for each pending branch: rows of one draw of `best_of` rows."""
        noise = torch.empty((self.strategy.best_of, vocab), device=device).exponential_(generator=self.generator)
        if len(self.pending) == self.strategy.best_of:
            return noise
        return noise.index_select(0, upload([self.slots[id(b)] for b in self.pending], device, torch.int64))

    def step_host(self, engine: Engine, chosen: list[float], rows: list[Branch] | None = None) -> None:
        """Record the chosen tokens (`chosen`: token, log-probability for each branch, as floats);
        finished branches give their blocks back at once. `rows`: the branches the step was
        launched for, when some of them stopped since (their values are skipped)."""
        if rows is not None:
            live = {id(b) for b in self.pending}
            chosen = [x for b, t, lp in zip(rows, chosen[0::2], chosen[1::2]) if id(b) in live for x in (t, lp)]
        self.num_generated += 1
        if len(self.pending) == 1:  # (greedy, shared-prompt batches: hundreds per host-bound step)
            running = self._record(engine, self.pending[0], int(chosen[0]), chosen[1])
            still_running = self.pending if running else []
        else:
            still_running = [branch for branch, token, logprob
                             in zip(self.pending, map(int, chosen[0::2]), chosen[1::2])
                             if self._record(engine, branch, token, logprob)]
        self.pending = still_running
        self.done = not still_running

    def _record(self, engine: Engine, branch: Branch, token: int, logprob: float) -> bool:
        """Append `token` to `branch`; True while it runs on, else its blocks are given back and
        its sequence is finished."""
        key = id(branch)
        sequence = self.generated[key]
        sequence.append(token)
        self.logprobs[key] += logprob
        reason = self.rule.finish_reason(sequence)
        if reason is None:
            branch.next_token = token
            return True
        engine.free(branch.table)
        branch.table = None
        self.finished.append(self._sequence(self.generated.pop(key), self.logprobs.pop(key), reason))
        return False

    def _sequence(self, generated: list[int], logprob: float, reason: str) -> GeneratedSequence:
        text = self.strategy.decode_text(generated)
        if reason == "stop":
            index = self.rule.stop_index(generated)
            text = self.strategy.tokenizer.decode(generated)[:index]
        return GeneratedSequence(generated, text, logprob, logprob, reason)

    def snapshot(self) -> dict:
        return {
            "prompt": self.prompt,
            "samples": [(list(self.generated[id(b)]), self.logprobs[id(b)]) for b in self.pending],
            "finished": [(s.token_ids, s.score) for s in self.finished],
            "done": self.done,
        }

    def results(self) -> list[GeneratedSequence]:
        ranked = sorted(self.finished, key=lambda s: s.score, reverse=True)
        return ranked[: self.strategy.n]


class ParallelSampling(Strategy):
    """n samples of one prompt sharing its prefilled blocks. Temperature, top_k, top_p, min_p and
    repetition_penalty are applied in HF's order; temperature 0 is greedy. Each is off unless given
    (HF's `generate(do_sample=True)` adds top_k=50 from its generation config: pass top_k=50 to
    sample as it does). `seed` makes each request's samples reproducible whatever shares its batch
    (request i of a batch uses seed + i); `best_of=m` draws m and returns the n with the highest
    cumulative logprob."""

    def __init__(self, model_or_engine, tokenizer=None, *, n: int = 4, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, best_of: int | None = None, max_new_tokens: int | None = None,
                 min_new_tokens: int = 0, eos_token_id: int | list[int] | None = None,
                 stop: str | list[str] | None = None, truncate_prompt: bool = False):
        self.n = check_int("n", n, 1)
        self.best_of = self.n if best_of is None else check_int("best_of", best_of, 1)
        if self.best_of < self.n:
            raise ValueError(f"best_of must be >= n ({n}), got {best_of}")
        self.params = SamplingParams(
            temperature=check_float("temperature", temperature, 0.0, float("inf"), high_open=True),
            top_k=check_int("top_k", top_k, 0),
            top_p=check_float("top_p", top_p, 0.0, 1.0, low_open=True),
            min_p=check_float("min_p", min_p, 0.0, 1.0),
            repetition_penalty=check_float("repetition_penalty", repetition_penalty, 0.0, float("inf"),
                                           low_open=True, high_open=True),
        )
        self.seed = None if seed is None else check_int("seed", seed, 0, 2**63 - 1)
        super().__init__(model_or_engine, tokenizer, max_new_tokens=max_new_tokens,
                         min_new_tokens=min_new_tokens, eos_token_id=eos_token_id, stop=stop,
                         truncate_prompt=truncate_prompt)
        self._requests_made = 0

    def make_request(self, prompt_ids: list[int]) -> SampleRequest:
        seed = None if self.seed is None else self.seed + self._requests_made
        self._requests_made += 1
        return SampleRequest(prompt_ids, self, seed)

    def steps(self, prompt):
        self._requests_made = 0
        yield from super().steps(prompt)


class Greedy(ParallelSampling):
    """Greedy decoding (HF `do_sample=False, num_beams=1`), token for token."""

    def __init__(self, model_or_engine, tokenizer=None, *, max_new_tokens: int | None = None,
                 min_new_tokens: int = 0, repetition_penalty: float = 1.0,
                 eos_token_id: int | list[int] | None = None, stop: str | list[str] | None = None,
                 truncate_prompt: bool = False):
        super().__init__(model_or_engine, tokenizer, n=1, temperature=0.0,
                         repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                         min_new_tokens=min_new_tokens, eos_token_id=eos_token_id, stop=stop,
                         truncate_prompt=truncate_prompt)
