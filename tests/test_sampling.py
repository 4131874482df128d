"""Sampling: the logits processors against Hugging Face's own classes, the sampled distribution
against the processed softmax (chi-square), seeds, temperature 0, best_of."""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sharedecode.engine import Engine
from sharedecode.sampling import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    ban_tokens,
    ban_tokens_,
    process_for_sampling,
    sample,
)
from sharedecode.strategies import Greedy, ParallelSampling

PAD = 0
EOS = [2, 3]


def tiny(vocab: int, seed: int, scale: float = 8.0, eos=EOS):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=eos, bos_token_id=1, pad_token_id=PAD, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def small():
    """vocab 96, two EOS ids: for seeds, greedy, best_of."""
    model = tiny(96, seed=11)
    return model, Engine(model, block_size=4, kv_cache_bytes=2**20, backend="torch")


@pytest.fixture(scope="module")
def vocab8():
    """vocab 8, no EOS: for the distribution tests. Moderate logits so every token has mass."""
    model = tiny(8, seed=12, scale=6.0, eos=None)
    return model, Engine(model, block_size=4, kv_cache_bytes=32 * 2**20, backend="torch")


def prompt_of(length: int, seed: int, vocab: int = 96) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, vocab) for _ in range(length)]


# --------------------------------------------------------------------- processors vs HF's classes
def _same(ours: torch.Tensor, theirs: torch.Tensor):
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 50, generator=g) * 3


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_hf(logits, temperature):
    _same(apply_temperature(logits, temperature), TemperatureLogitsWarper(temperature)(None, logits.clone()))


@pytest.mark.parametrize("top_k", [1, 5, 49, 50, 80])
def test_top_k_matches_hf(logits, top_k):
    _same(apply_top_k(logits, top_k), TopKLogitsWarper(top_k)(None, logits.clone()))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(logits, top_p):
    _same(apply_top_p(logits, top_p), TopPLogitsWarper(top_p)(None, logits.clone()))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_hf(logits, min_p):
    _same(apply_min_p(logits, min_p), MinPLogitsWarper(min_p)(None, logits.clone()))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_hf(logits, penalty):
    g = torch.Generator().manual_seed(1)
    seen = torch.randint(0, 50, (6, 12), generator=g)  # with repeats
    ours = apply_repetition_penalty(logits, seen.tolist(), penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
    _same(ours, theirs)


def test_repetition_penalty_with_histories_of_different_lengths(logits):
    seen = [[1, 2, 3], [4], [5, 5, 6, 7, 8], [9, 1], [0], [49, 48]]
    ours = apply_repetition_penalty(logits, seen, 1.5)
    for row, history in enumerate(seen):
        theirs = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([history]), logits[row:row + 1].clone())
        _same(ours[row:row + 1], theirs)


def test_min_new_tokens_ban_matches_hf(logits):
    ids = torch.zeros(6, 10, dtype=torch.long)
    hf = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=7, min_new_tokens=5, eos_token_id=[2, 3])
    _same(ban_tokens(logits, [2, 3]), hf(ids, logits.clone()))  # 3 new tokens < 5: banned
    rows = torch.tensor([True, False, True, False, False, True])
    banned = ban_tokens(logits, [2, 3], rows)
    assert torch.isinf(banned[rows][:, [2, 3]]).all() and not torch.isinf(banned[~rows]).any()


def test_ban_tokens_in_place_touches_only_the_banned_cells(logits):
    scores = logits.clone()
    rows = torch.tensor([True, False, True, False, False, True])
    assert ban_tokens_(scores, [3, 7, 3], rows) is scores  # a repeated id is harmless
    expected = logits.clone()
    expected[rows.nonzero()[:, 0][:, None], torch.tensor([3, 7])] = float("-inf")
    _same(scores, expected)
    _same(ban_tokens(logits, []), logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ban_tokens_does_not_synchronise_with_the_device():
    scores = torch.randn(8, 1000, device="cuda")
    rows = torch.tensor([True, False] * 4).pin_memory().to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ban_tokens_(scores, [2, 5])
        ban_tokens_(scores, [7], rows)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isinf(scores[:, [2, 5]]).all() and torch.isinf(scores[::2, 7]).all()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.5, top_k=0, top_p=0.5),
    SamplingParams(temperature=0.5, min_p=0.2),
    SamplingParams(),
])
def test_processing_pipeline_matches_hf_order(logits, params):
    hf = LogitsProcessorList()
    hf.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        hf.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        hf.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        hf.append(MinPLogitsWarper(params.min_p))
    before = logits.clone()
    _same(process_for_sampling(logits, params), hf(None, logits.clone()))
    assert torch.equal(logits, before)  # inputs are left alone


def test_sample_uses_one_generator_per_row():
    probs = torch.softmax(torch.randn(3, 20), dim=-1)
    a = sample(probs, [torch.Generator().manual_seed(i) for i in range(3)])
    b = sample(probs[1:2], [torch.Generator().manual_seed(1)])
    assert a[1] == b[0]


# ------------------------------------------------------------------------- sampled distributions
def processed_probs(model, ids: list[int], params: SamplingParams) -> torch.Tensor:
    """HF's processed next-token distribution for `ids`, through HF's own processor classes."""
    with torch.no_grad():
        scores = model(torch.tensor([ids])).logits[:, -1, :].float()
    hf = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        hf.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    hf.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        hf.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        hf.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        hf.append(MinPLogitsWarper(params.min_p))
    return torch.softmax(hf(torch.tensor([ids]), scores), dim=-1)[0].double()


def assert_distribution(counts: torch.Tensor, probs: torch.Tensor):
    """Chi-square goodness of fit; bins expecting fewer than 5 draws are pooled into one."""
    n = int(counts.sum())
    support = probs > 0
    assert counts[~support].sum() == 0, (counts, probs)  # filtered tokens are never drawn
    assert support.sum() >= 2  # a meaningful test
    expected = (probs / probs.sum() * n)[support]
    observed = counts[support].double()
    small = expected < 5
    if small.any():
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
    assert len(expected) >= 2
    expected = expected * (observed.sum() / expected.sum())  # exact totals for scipy
    result = chisquare(observed.numpy(), expected.numpy())
    assert result.pvalue > 1e-3, (counts, probs * n, result)


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.4, top_k=4),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.2, min_p=0.15),
    dict(temperature=0.9, repetition_penalty=1.8),
    dict(temperature=1.1, top_k=6, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_first_token_distribution_chi_square(vocab8, setting):
    model, engine = vocab8
    prompt = [4, 5, 6, 4, 7]
    n = 8000
    result = ParallelSampling(engine, n=n, seed=123, max_new_tokens=1, eos_token_id=[], **setting).run(prompt)
    assert engine.kv_stats().blocks_in_use == 0
    firsts = torch.tensor([s.token_ids[0] for s in result.sequences])
    counts = torch.bincount(firsts, minlength=8)
    probs = processed_probs(model, prompt, SamplingParams(**setting))
    assert_distribution(counts, probs)
    # Each sample's logprob is the log of its processed probability.
    for seq in result.sequences[:20]:
        assert abs(seq.logprob - float(probs[seq.token_ids[0]].log())) < 1e-4


def test_second_token_distribution_chi_square(vocab8):
    """Later steps draw from the distribution after the sampled history (repetition included)."""
    model, engine = vocab8
    prompt = [5, 4, 6, 7]
    setting = dict(temperature=1.3, top_k=6, repetition_penalty=1.4)
    result = ParallelSampling(engine, n=8000, seed=7, max_new_tokens=2, eos_token_id=[], **setting).run(prompt)
    assert engine.kv_stats().blocks_in_use == 0
    firsts = [s.token_ids[0] for s in result.sequences]
    common = max(set(firsts), key=firsts.count)
    seconds = torch.tensor([s.token_ids[1] for s in result.sequences if s.token_ids[0] == common])
    counts = torch.bincount(seconds, minlength=8)
    probs = processed_probs(model, prompt + [common], SamplingParams(**setting))
    assert_distribution(counts, probs)


# ----------------------------------------------------------------------------- seeds and greedy
def _tokens(result):
    return [s.token_ids for s in result.sequences]


def test_same_seed_same_samples(small):
    model, engine = small
    prompt = prompt_of(9, 1)
    params = dict(n=4, temperature=1.2, top_p=0.95, max_new_tokens=10, seed=42)
    first = ParallelSampling(engine, **params).run(prompt)
    again = ParallelSampling(engine, **params).run(prompt)
    assert _tokens(first) == _tokens(again)
    # (not bit-equal: the second run finds the prompt's full blocks cached and prefills only the rest)
    assert [s.logprob for s in first.sequences] == pytest.approx([s.logprob for s in again.sequences], abs=1e-4)
    other = ParallelSampling(engine, **{**params, "seed": 43}).run(prompt)
    assert _tokens(other) != _tokens(first)
    assert len({tuple(t) for t in _tokens(first)}) > 1  # the n samples differ from each other
    assert engine.kv_stats().blocks_in_use == 0


def test_seed_independent_of_the_batch(small):
    """Request i of a batch uses seed + i, whatever else shares its decode steps."""
    model, engine = small
    a, b, c = prompt_of(5, 2), prompt_of(13, 3), prompt_of(8, 4)
    params = dict(n=3, temperature=1.0, top_k=20, max_new_tokens=12)
    batch = ParallelSampling(engine, seed=100, **params).run([a, b, c])
    assert _tokens(batch[0]) == _tokens(ParallelSampling(engine, seed=100, **params).run(a))
    assert _tokens(batch[1]) == _tokens(ParallelSampling(engine, seed=101, **params).run(b))
    assert _tokens(batch[2]) == _tokens(ParallelSampling(engine, seed=102, **params).run(c))
    # And the same strategy object run twice starts again from seed + 0.
    strategy = ParallelSampling(engine, seed=100, **params)
    strategy.run([a, b])
    assert _tokens(strategy.run(a)) == _tokens(batch[0])
    assert engine.kv_stats().blocks_in_use == 0


def test_unseeded_sampling_follows_torch_manual_seed(small):
    model, engine = small
    prompt = prompt_of(6, 5)
    torch.manual_seed(9)
    first = ParallelSampling(engine, n=2, max_new_tokens=8).run(prompt)
    torch.manual_seed(9)
    again = ParallelSampling(engine, n=2, max_new_tokens=8).run(prompt)
    assert _tokens(first) == _tokens(again)


@pytest.mark.parametrize("min_new", [0, 4])
def test_temperature_zero_is_greedy(small, min_new):
    model, engine = small
    prompt = prompt_of(7, 6)
    sampled = ParallelSampling(engine, n=3, temperature=0.0, max_new_tokens=12, min_new_tokens=min_new,
                               top_k=5, seed=1).run(prompt)
    greedy = Greedy(engine, max_new_tokens=12, min_new_tokens=min_new).run(prompt)
    assert _tokens(sampled) == _tokens(greedy) * 3
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                            max_new_tokens=12, min_new_tokens=min_new, pad_token_id=PAD, eos_token_id=EOS)
    row = hf[0, len(prompt):].tolist()
    ours = greedy.sequences[0].token_ids
    assert row[:len(ours)] == ours and all(t == PAD for t in row[len(ours):])


def test_best_of_returns_the_n_highest_logprobs(small):
    model, engine = small
    prompt = prompt_of(8, 7)
    params = dict(temperature=1.3, max_new_tokens=8, seed=5)
    everything = ParallelSampling(engine, n=6, **params).run(prompt)
    best = ParallelSampling(engine, n=2, best_of=6, **params).run(prompt)
    assert len(best.sequences) == 2
    logprobs = [s.logprob for s in everything.sequences]
    assert logprobs == sorted(logprobs, reverse=True)
    assert [s.logprob for s in best.sequences] == pytest.approx(logprobs[:2], abs=1e-4)
    assert _tokens(best) == _tokens(everything)[:2]
    assert engine.kv_stats().blocks_in_use == 0


def test_sample_logprob_is_the_processed_logprob(small):
    """The reported cumulative logprob sums the processed distribution's log-probs step by step."""
    model, engine = small
    prompt = prompt_of(6, 8)
    setting = dict(temperature=0.8, top_k=12, repetition_penalty=1.2)
    result = ParallelSampling(engine, n=2, seed=3, max_new_tokens=6, **setting).run(prompt)
    for seq in result.sequences:
        total = 0.0
        for i, token in enumerate(seq.token_ids):
            probs = processed_probs(model, prompt + seq.token_ids[:i], SamplingParams(**setting))
            assert probs[token] > 0
            total += float(probs[token].log())
        assert abs(total - seq.logprob) < 1e-3


def test_validation(small):
    model, engine = small
    with pytest.raises(ValueError):
        ParallelSampling(engine, n=3, best_of=2)
    with pytest.raises(ValueError):
        ParallelSampling(engine, top_p=0.0)
    with pytest.raises(ValueError):
        ParallelSampling(engine, temperature=-1.0)
    with pytest.raises(TypeError):
        ParallelSampling(engine, n=2.5)
