"""Many user prompts behind one system prompt: its blocks are computed once and shared."""

from __future__ import annotations

from sharedecode.results import GenerationResult
from sharedecode.strategies.base import Strategy, resolve_engine
from sharedecode.strategies.beam_search import BeamSearch
from sharedecode.strategies.sampling import Greedy, ParallelSampling

STRATEGIES = {"greedy": Greedy, "beam": BeamSearch, "sample": ParallelSampling}


class SharedPromptBatch:
    """`SharedPromptBatch(model, tok, system_prompt=..., strategy="greedy", **params).run(user_prompts)`.

    Each request is the tokenizer's chat template of (system prompt, user prompt) when it has one,
    the plain concatenation otherwise. The prompts' common leading blocks are computed once (block
    prefix sharing) and the saving shows in `result.stats.prefill_tokens_reused`.
    `strategy` is "greedy", "beam", "sample", or a strategy class; `params` go to it.
    """

    def __init__(self, model_or_engine, tokenizer=None, *, system_prompt: str | list[int],
                 strategy: str | type[Strategy] = "greedy", **params):
        if isinstance(strategy, str):
            if strategy not in STRATEGIES:
                raise ValueError(f"strategy must be one of {sorted(STRATEGIES)} or a strategy class, "
                                 f"got {strategy!r}")
            strategy = STRATEGIES[strategy]
        elif not (isinstance(strategy, type) and issubclass(strategy, Strategy)):
            raise TypeError(f"strategy must be a name or a Strategy class, got {strategy!r}")
        self.engine = resolve_engine(model_or_engine, tokenizer)
        self.strategy = strategy(self.engine, tokenizer, **params)
        if isinstance(system_prompt, str):
            if self.strategy.tokenizer is None:
                raise ValueError("a string system_prompt needs a tokenizer")
        elif not isinstance(system_prompt, (list, tuple)):
            raise TypeError("system_prompt must be a string or a list of token ids")
        self.system_prompt = system_prompt

    def build_prompt(self, user_prompt: str | list[int]) -> list[int]:
        tokenizer = self.strategy.tokenizer
        if isinstance(self.system_prompt, str) and isinstance(user_prompt, str):
            if getattr(tokenizer, "chat_template", None):
                messages = [{"role": "system", "content": self.system_prompt},
                            {"role": "user", "content": user_prompt}]
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            return self.strategy.encode(self.system_prompt + user_prompt)
        system = self.strategy.encode(self.system_prompt)
        return system + self.strategy.encode(user_prompt)

    def run(self, user_prompts: list) -> list[GenerationResult]:
        self.strategy.run(self._prompts(user_prompts))
        return self.strategy.last_results

    def stream(self, user_prompts: list):
        yield from self.strategy.stream(self._prompts(user_prompts))

    def _prompts(self, user_prompts: list) -> list[list[int]]:
        if not isinstance(user_prompts, (list, tuple)) or not user_prompts:
            raise TypeError("user_prompts must be a non-empty list of strings or token-id lists")
        return [self.build_prompt(p) for p in user_prompts]
