"""What every strategy shares: the engine, prompts, stopping rules, and running requests."""

from __future__ import annotations

import math
import numbers
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator

import torch

from sharedecode.engine import Engine
from sharedecode.results import GenerationResult, GenerationStats
from sharedecode.scheduler import Request, Scheduler


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be >= {minimum}{upper}, got {value}")
    return int(value)


def check_float(name: str, value, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def resolve_engine(model_or_engine, tokenizer) -> Engine:
    """The engine to run on; an existing one is shared as it is (a strategy's own tokenizer
    stays with the strategy, so other strategies on the same engine are not affected)."""
    if isinstance(model_or_engine, Engine):
        return model_or_engine
    return Engine(model_or_engine, tokenizer)


@dataclass
class StopRule:
    """When a sequence is finished: an EOS id, a stop string in its text, or max_new_tokens."""

    eos_token_ids: list[int]
    stop_strings: list[str]
    max_new_tokens: int
    min_new_tokens: int
    tokenizer: object | None

    def finish_reason(self, generated: list[int]) -> str | None:
        if generated and generated[-1] in self.eos_token_ids:
            return "eos"
        if self.stop_strings and self.stop_index(generated) is not None:
            return "stop"
        if len(generated) >= self.max_new_tokens:
            return "length"
        return None

    def stop_index(self, generated: list[int]) -> int | None:
        """Where the first stop string starts in the decoded text, if the newest token completed one."""
        longest = max(len(s) for s in self.stop_strings)
        tail = self.tokenizer.decode(generated[-(longest + 1):])
        if not any(s in tail for s in self.stop_strings):
            return None
        text = self.tokenizer.decode(generated)
        found = [text.find(s) for s in self.stop_strings if s in text]
        return min(found) if found else None

    def bans_eos(self, num_generated: int) -> bool:
        return num_generated < self.min_new_tokens


class Strategy:
    """Base of the decoding strategies: validation, prompts, results; subclasses make requests."""

    def __init__(self, model_or_engine, tokenizer=None, *, max_new_tokens: int | None = None,
                 min_new_tokens: int = 0, eos_token_id: int | list[int] | None = None,
                 stop: str | list[str] | None = None, truncate_prompt: bool = False):
        self.engine = resolve_engine(model_or_engine, tokenizer)
        self.tokenizer = tokenizer if tokenizer is not None else self.engine.tokenizer
        self.last_results: GenerationResult | list[GenerationResult] | None = None
        generation_config = getattr(self.engine.model, "generation_config", None)
        if max_new_tokens is None:
            max_new_tokens = getattr(generation_config, "max_new_tokens", None) or 20
        context = self.engine.shape.max_context
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1,
                                        None if context is None else context - 1)
        self.min_new_tokens = check_int("min_new_tokens", min_new_tokens, 0, self.max_new_tokens)
        if eos_token_id is None:
            eos_token_id = getattr(generation_config, "eos_token_id", None)
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        if eos_token_id is None:
            eos_ids = []
        elif isinstance(eos_token_id, numbers.Integral):
            eos_ids = [eos_token_id]
        elif isinstance(eos_token_id, (list, tuple)):
            eos_ids = list(eos_token_id)
        else:
            raise TypeError(f"eos_token_id must be an int, a list of ints or None, "
                            f"got {type(eos_token_id).__name__} {eos_token_id!r}")
        for token in eos_ids:
            check_int("eos_token_id", token, 0, self.engine.shape.vocab_size - 1)
        self.eos_token_ids = [int(t) for t in eos_ids]
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None:
            if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
                raise TypeError("stop must be a non-empty string or a list of non-empty strings")
            if self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer to decode the text")
        self.stop_strings = list(stop or [])
        if not isinstance(truncate_prompt, bool):
            raise TypeError(f"truncate_prompt must be True or False, got {truncate_prompt!r}")
        self.truncate_prompt = truncate_prompt
        self._check_width()

    def _check_width(self) -> None:
        """Each sequence a request runs at once needs a KV block of its own (its last one), so
        num_beams / best_of beyond the cache's block count could never run."""
        name = "num_beams" if hasattr(self, "num_beams") else "best_of"
        width = getattr(self, name, 1)
        num_blocks = self.engine.allocator.num_blocks
        if width > num_blocks:
            raise ValueError(
                f"{name} must be <= {num_blocks} (the KV cache's block count: every sequence needs "
                f"a block of its own), got {width}; raise kv_cache_bytes"
            )

    # ---------------------------------------------------------------- prompts
    def encode(self, prompt) -> list[int]:
        """A string or a list of token ids -> validated token ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a string prompt needs a tokenizer: pass tokenizer=... or token ids")
            if not prompt:
                raise ValueError("prompt must not be empty")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
            vocab = self.engine.shape.vocab_size
            # Fast path for plain ints (a 1k-token prompt x 256 requests made the per-token checks
            # below cost more than a decode step); anything else gets the precise message.
            plain = set(map(type, ids)) == {int}
            for token in () if plain and 0 <= min(ids) and max(ids) < vocab else ids:
                if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                    raise TypeError(f"token ids must be ints, got {type(token).__name__} {token!r}")
                if not 0 <= token < vocab:
                    raise ValueError(f"token id {token} is outside the vocabulary [0, {vocab})")
            if not plain:
                ids = [int(t) for t in ids]
        else:
            raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt must not be empty")
        limit = self.engine.shape.max_context
        if limit is not None and len(ids) + self.max_new_tokens > limit:
            if len(ids) >= limit or not self.truncate_prompt:
                raise ValueError(
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds the "
                    f"model's context of {limit} tokens; shorten the prompt, lower max_new_tokens, or "
                    "pass truncate_prompt=True to keep the prompt's last tokens"
                )
            ids = ids[len(ids) + self.max_new_tokens - limit:]
        return ids

    def split_batch(self, prompt) -> tuple[list[list[int]], bool]:
        """-> (token ids per prompt, whether the input was a batch)."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
            return [self.encode(p) for p in prompt], True
        if isinstance(prompt, (list, tuple)) and prompt and any(isinstance(p, (str, list, tuple)) for p in prompt):
            raise TypeError("a batch must be a list of prompts, each a string or a list of token ids")
        return [self.encode(prompt)], False

    def stop_rule(self) -> StopRule:
        return StopRule(self.eos_token_ids, self.stop_strings, self.max_new_tokens, self.min_new_tokens,
                        self.tokenizer)

    def decode_text(self, token_ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---------------------------------------------------------------- running
    def make_request(self, prompt_ids: list[int]) -> Request:
        raise NotImplementedError

    def run(self, prompt) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (a string or token ids) or a batch (a list of them)."""
        for _ in self.steps(prompt):
            pass
        return self.last_results

    def stream(self, prompt) -> Iterator[list]:
        """Run step by step, yielding the requests' current state (`request.snapshot()` each) after
        every step; `self.last_results` holds the results when the iteration ends."""
        with closing(self.steps(prompt)) as steps:  # stopping early frees the blocks at once
            for requests in steps:
                yield [r.snapshot() for r in requests]

    def steps(self, prompt) -> Iterator[list[Request]]:
        """Run step by step, yielding the requests after every step (`run` takes no snapshots:
        copying every sequence's tokens each step grows with the square of the length)."""
        prompts, is_batch = self.split_batch(prompt)
        requests = [self.make_request(ids) for ids in prompts]
        stats = GenerationStats()
        scheduler = Scheduler(self.engine, stats)
        steps = scheduler.iterate(requests)
        try:
            for _ in steps:
                yield requests
        finally:  # frees the requests' blocks now, not when the garbage collector gets to `steps`
            steps.close()
        results = [GenerationResult(r.prompt, r.results(), stats) for r in requests]
        stats.generated_tokens = sum(len(s.token_ids) for res in results for s in res.sequences)
        self.last_results = results if is_batch else results[0]
