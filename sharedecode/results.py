"""What a run returns: sequences best first, and statistics of the cache and the work done."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GeneratedSequence:
    token_ids: list[int]  # generated tokens only
    text: str | None
    score: float  # beam search: HF's length-penalised sequences_scores; sampling: cumulative logprob
    logprob: float  # cumulative log-probability of the generated tokens (processed distribution)
    finish_reason: str  # "eos", "stop" or "length"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_tokens_computed: int = 0
    prefill_tokens_reused: int = 0  # prompt tokens found in shared cached blocks
    decode_steps: int = 0
    generated_tokens: int = 0
    peak_blocks_in_use: int = 0
    peak_kv_bytes: int = 0
    peak_contiguous_kv_bytes: int = 0  # every sequence holding its own prompt + output
    preemptions: int = 0
    wall_time_s: float = 0.0

    @property
    def kv_memory_saved(self) -> float:
        """Fraction of the contiguous equivalent that the paged, shared cache did not need."""
        if self.peak_contiguous_kv_bytes == 0:
            return 0.0
        return 1.0 - self.peak_kv_bytes / self.peak_contiguous_kv_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "kv_memory_saved": self.kv_memory_saved}


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    sequences: list[GeneratedSequence]
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def text(self) -> str | None:
        """The best sequence's text."""
        return self.sequences[0].text if self.sequences else None

    def to_dict(self) -> dict:
        return {
            "prompt_token_ids": self.prompt_token_ids,
            "sequences": [asdict(s) for s in self.sequences],
            "stats": self.stats.to_dict(),
        }
