"""Logits processors as plain functions over a batch `[N, V]`, in Hugging Face's order.

HF applies repetition penalty, then the minimum-length EOS ban, then (sampling only) temperature,
top-k, top-p and min-p. Each function here returns a new tensor and leaves its input alone (those
ending in `_` work in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sharedecode.kernels.fused_sampling import top_p_sample
from sharedecode.kernels.paged_attention import HAS_TRITON
from sharedecode.uploads import to_device

NEG_INF = float("-inf")
# The top-p cut and the draw as one Triton kernel on CUDA (kernels/fused_sampling.py) instead of a
# sort and a dozen full-size torch ops; False: the torch ops everywhere (a benchmark's ablation).
FUSED_TOP_P = True


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


def apply_repetition_penalty(scores: torch.Tensor, seen: list[list[int]], penalty: float) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor: every token already in a sequence (prompt included)
    has its logit divided by `penalty` when positive, multiplied when negative."""
    if penalty == 1.0:
        return scores
    width = max(len(s) for s in seen)
    index = to_device([s + [s[0]] * (width - len(s)) for s in seen], scores.device)
    picked = scores.gather(1, index)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, index, picked)


def ban_tokens(scores: torch.Tensor, token_ids: list[int], rows: torch.Tensor | None = None) -> torch.Tensor:
    """Set `token_ids` to -inf (in `rows` only, a bool mask, when given): HF's min-new-tokens rule."""
    if not token_ids:
        return scores
    return ban_tokens_(scores.clone(), token_ids, rows)


def ban_tokens_(scores: torch.Tensor, token_ids: list[int], rows: torch.Tensor | None = None) -> torch.Tensor:
    """`ban_tokens` in place (for a tensor the caller owns); returns `scores`.

    One column at a time through basic indexing: `scores[:, ids] = ...` with an index tensor is an
    `index_put_`, which on CUDA waits for the device (on the GPU it held every decode step's host
    work behind the whole forward)."""
    for token in dict.fromkeys(token_ids):
        column = scores[:, token]
        if rows is None:
            column.fill_(NEG_INF)
        else:  # a mask instead of row indices: no host sync
            column.masked_fill_(rows, NEG_INF)
    return scores


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores if temperature == 1.0 else scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int, min_keep: int = 1) -> torch.Tensor:
    if top_k <= 0:
        return scores
    k = min(max(top_k, min_keep), scores.shape[-1])
    threshold = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < threshold, NEG_INF)


def apply_top_p(scores: torch.Tensor, top_p: float, min_keep: int = 1) -> torch.Tensor:
    if top_p >= 1.0:
        return scores
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -min_keep:] = False
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, NEG_INF)


def apply_min_p(scores: torch.Tensor, min_p: float, min_keep: int = 1) -> torch.Tensor:
    if min_p <= 0.0:
        return scores
    probs = scores.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, keep, False)
    return scores.masked_fill(remove, NEG_INF)


def process_for_sampling(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p: HF's warpers in HF's order."""
    scores = apply_temperature(scores, params.temperature)
    scores = apply_top_k(scores, params.top_k)
    scores = apply_top_p(scores, params.top_p)
    return apply_min_p(scores, params.min_p)


def race(scores: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponential race: argmax(p / noise) with noise ~ Exp(1) draws from p = softmax(scores)
    without a host sync. Returns each row's token and its log-probability."""
    logprobs = torch.log_softmax(scores, dim=-1)
    tokens = (logprobs.exp() / noise).argmax(dim=-1)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def _runs_fused(scores: torch.Tensor, params: SamplingParams) -> bool:
    """Whether `draw_tokens` takes the kernel (the kernel tests also route the CPU through it)."""
    return FUSED_TOP_P and HAS_TRITON and params.min_p == 0.0 and scores.is_cuda


def draw_tokens(scores: torch.Tensor, noise: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's warpers (`process_for_sampling`), then one token per row drawn by `race` with `noise`.
    On CUDA without min_p the top-p cut and the draw are one kernel (`top_p_sample`: the same cut
    but for tokens within float32 rounding of it, see its module)."""
    if not _runs_fused(scores, params):
        return race(process_for_sampling(scores, params), noise)
    scores = apply_top_k(apply_temperature(scores, params.temperature), params.top_k)
    return top_p_sample(scores.contiguous(), noise.contiguous(), params.top_p)


def sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `probs` [N, V]; row i draws from `generators[i]` so that a seeded
    request's samples do not depend on what else shares its batch."""
    tokens = []
    for row, generator in zip(probs, generators):
        tokens.append(torch.multinomial(row, 1, generator=generator))
    return torch.cat(tokens)
