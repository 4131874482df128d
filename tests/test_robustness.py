"""Robustness: a full KV cache never crashes a run, and nothing leaks after an exception.

A tiny random Llama built from a config (fast, and independent of the embedded model's files)
runs on CPU with the torch backend. "Small budget" engines hold a few dozen blocks, so that the
scheduler has to defer admissions and preempt (free, later recompute) running requests.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from sharedecode import BeamSearch, Engine, KVCacheFull, ParallelSampling, SharedPromptBatch
from sharedecode.block_allocator import BlockAllocator
from sharedecode.scheduler import blocks_to_allocate_together

VOCAB = 256
BLOCK = 8


def tiny_llama(vocab: int = VOCAB, max_positions: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def engine_with_blocks(model, num_blocks: int, tokenizer=None) -> Engine:
    probe = Engine(model, tokenizer, kv_cache_bytes=2**16, block_size=BLOCK)
    return Engine(model, tokenizer, kv_cache_bytes=num_blocks * probe.layout.bytes_per_block,
                  block_size=BLOCK)


def random_prompts(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def assert_clean(engine: Engine) -> None:
    engine.allocator.check()
    stats = engine.kv_stats()
    assert stats.blocks_in_use == 0, stats
    assert stats.num_sequences == 0, stats


def same_results(a, b, *, score_tol: float = 1e-3) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert [s.token_ids for s in ra.sequences] == [s.token_ids for s in rb.sequences]
        assert [s.finish_reason for s in ra.sequences] == [s.finish_reason for s in rb.sequences]
        for sa, sb in zip(ra.sequences, rb.sequences):
            assert sa.score == pytest.approx(sb.score, abs=score_tol)


# ----------------------------------------------------------------------------- memory pressure
def test_64_beam_searches_under_a_small_budget_match_a_large_one(model):
    prompts = random_prompts(64, 3, 12, seed=1)
    params = dict(num_beams=4, max_new_tokens=10, eos_token_id=[], num_return_sequences=2)
    large = Engine(model, kv_cache_bytes=2**22, block_size=BLOCK)
    expected = BeamSearch(large, **params).run(prompts)
    assert expected[0].stats.preemptions == 0
    small = engine_with_blocks(model, 20)
    got = BeamSearch(small, **params).run(prompts)
    assert got[0].stats.preemptions > 0
    assert got[0].stats.peak_blocks_in_use <= 20
    same_results(got, expected)
    assert_clean(small)
    assert_clean(large)


def test_seeded_sampling_under_a_small_budget_matches_a_large_one(model):
    prompts = random_prompts(32, 2, 10, seed=2)
    params = dict(n=4, temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_new_tokens=10,
                  eos_token_id=[7])
    expected = ParallelSampling(Engine(model, kv_cache_bytes=2**22, block_size=BLOCK), **params).run(prompts)
    small = engine_with_blocks(model, 18)
    got = ParallelSampling(small, **params).run(prompts)
    assert got[0].stats.preemptions > 0
    same_results(got, expected)
    assert_clean(small)


def test_preempted_beams_with_a_long_shared_prompt_resume(model):
    """A preempted beam search is recomputed with its beams sharing their prompt's blocks again:
    counting each beam's whole history separately (6 x 11 blocks) would exceed this cache (50)
    and fail a request that ran in it before."""
    prompts = random_prompts(3, 60, 60, seed=3)
    params = dict(num_beams=6, max_new_tokens=40, eos_token_id=[])
    expected = BeamSearch(Engine(model, kv_cache_bytes=2**22, block_size=BLOCK), **params).run(prompts)
    small = engine_with_blocks(model, 50)
    got = BeamSearch(small, **params).run(prompts)
    assert got[0].stats.preemptions > 0
    same_results(got, expected)
    assert_clean(small)


def test_shared_prompt_batch_under_pressure(model):
    system = random_prompts(1, 20, 20, seed=4)[0]
    users = random_prompts(24, 1, 6, seed=5)
    params = dict(system_prompt=system, strategy="beam", num_beams=3, max_new_tokens=8, eos_token_id=[])
    expected = SharedPromptBatch(Engine(model, kv_cache_bytes=2**22, block_size=BLOCK), **params).run(users)
    assert expected[0].stats.prefill_tokens_reused > 0
    small = engine_with_blocks(model, 16)
    got = SharedPromptBatch(small, **params).run(users)
    assert got[0].stats.preemptions > 0
    same_results(got, expected)
    assert_clean(small)


def test_a_prompt_longer_than_the_cache_raises_before_any_work(model):
    engine = engine_with_blocks(model, 4)
    strategy = BeamSearch(engine, num_beams=2, max_new_tokens=2)
    with pytest.raises(KVCacheFull, match="kv_cache_bytes"):
        strategy.run([[1, 2, 3], list(range(40))])
    assert_clean(engine)
    # The engine still works for what fits.
    assert len(strategy.run([1, 2, 3]).sequences) == 1
    assert_clean(engine)


def test_beams_that_cannot_fit_alone_raise_kvcachefull_and_free_everything(model):
    engine = engine_with_blocks(model, 6)
    with pytest.raises(KVCacheFull, match="raise kv_cache_bytes"):
        BeamSearch(engine, num_beams=4, max_new_tokens=30, eos_token_id=[]).run([[1, 2, 3], [4, 5, 6]])
    assert_clean(engine)
    with pytest.raises(ValueError, match="num_beams must be <= 6"):
        BeamSearch(engine, num_beams=7)
    with pytest.raises(ValueError, match="best_of must be <= 6"):
        ParallelSampling(engine, n=2, best_of=8)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_blocks=st.integers(3, 40), kind=st.sampled_from(["beam", "sample"]),
       count=st.integers(1, 12), width=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_any_budget_finishes_or_raises_kvcachefull(model, num_blocks, kind, count, width, seed):
    prompts = random_prompts(count, 1, 20, seed=seed)
    if kind == "beam":
        params = dict(num_beams=width, max_new_tokens=6, eos_token_id=[3])
        make = BeamSearch
    else:
        params = dict(n=width, seed=seed, max_new_tokens=6, eos_token_id=[3])
        make = ParallelSampling
    expected = make(Engine(model, kv_cache_bytes=2**22, block_size=BLOCK), **params).run(prompts)
    small = engine_with_blocks(model, num_blocks)
    if width > num_blocks:  # refused up front: every sequence needs a block of its own
        with pytest.raises(ValueError, match="raise kv_cache_bytes"):
            make(small, **params)
        assert_clean(small)
        return
    try:
        got = make(small, **params).run(prompts)
    except KVCacheFull:
        pass  # some request cannot fit even alone
    else:
        same_results(got, expected)
    assert_clean(small)


# ----------------------------------------------------------------------------- resume accounting
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_blocks_to_allocate_together_matches_allocation(data):
    block_size = data.draw(st.sampled_from([1, 2, 4]))
    allocator = BlockAllocator(512, block_size)
    base = data.draw(st.lists(st.integers(0, 3), min_size=0, max_size=12))

    def sequence():
        cut = data.draw(st.integers(0, len(base)))
        tail = data.draw(st.lists(st.integers(0, 3), min_size=0 if cut else 1, max_size=8))
        return base[:cut] + tail

    # Some cached (evictable) prefixes, some sequences still live.
    for _ in range(data.draw(st.integers(0, 3))):
        table = allocator.allocate(sequence())
        allocator.mark_computed(table)
        if data.draw(st.booleans()):
            allocator.free(table)
    batch = [sequence() for _ in range(data.draw(st.integers(1, 5)))]
    estimate = blocks_to_allocate_together(allocator, batch)
    free_before = allocator.num_free_blocks
    for tokens in batch:
        allocator.allocate(tokens)
    assert free_before - allocator.num_free_blocks == estimate
    allocator.check()


# ----------------------------------------------------------------------------- nothing leaks
def beam(engine, **kw):
    return BeamSearch(engine, num_beams=3, max_new_tokens=8, eos_token_id=[], **kw)


def sampling(engine, **kw):
    return ParallelSampling(engine, n=3, seed=0, max_new_tokens=8, eos_token_id=[], **kw)


def shared(engine, **kw):
    return SharedPromptBatch(engine, system_prompt=list(range(10, 30)), strategy="sample", n=2, seed=0,
                             max_new_tokens=8, eos_token_id=[], **kw)


MAKERS = {"beam": beam, "sample": sampling, "shared": shared}


def prompts_for(kind: str) -> list[list[int]]:
    return random_prompts(10, 1, 6, seed=9) if kind == "shared" else random_prompts(10, 2, 14, seed=8)


@pytest.mark.parametrize("num_blocks", [200, 14], ids=["roomy", "pressure"])
@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("after_steps", [0, 1, 3])
def test_keyboard_interrupt_while_streaming_frees_everything(model, kind, num_blocks, after_steps):
    engine = engine_with_blocks(model, num_blocks)
    strategy = MAKERS[kind](engine)
    with pytest.raises(KeyboardInterrupt):
        for step, _ in enumerate(strategy.stream(prompts_for(kind))):
            assert engine.kv_stats().blocks_in_use > 0
            if step == after_steps:
                raise KeyboardInterrupt
    assert_clean(engine)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_closing_or_abandoning_the_stream_frees_everything(model, kind):
    engine = engine_with_blocks(model, 14)
    strategy = MAKERS[kind](engine)
    stream = strategy.stream(prompts_for(kind))
    next(stream)
    next(stream)
    assert engine.kv_stats().blocks_in_use > 0
    stream.close()
    assert_clean(engine)
    for step, _ in enumerate(strategy.stream(prompts_for(kind))):
        if step == 2:
            break
    assert_clean(engine)
    # And the engine still gives the same results as a fresh one.
    fresh = MAKERS[kind](engine_with_blocks(model, 14)).run(prompts_for(kind))
    same_results(strategy.run(prompts_for(kind)), fresh)
    assert_clean(engine)


class Boom(Exception):
    pass


def raise_on_call(monkeypatch, obj, name: str, at: int, exc: type[BaseException] = Boom):
    original = getattr(obj, name)
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise exc(f"{name} call {at}")
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)
    return calls


@pytest.mark.parametrize(("hook", "exc"), [("prefill", Boom), ("decode", KeyboardInterrupt), ("add", Boom),
                                           ("add", KeyboardInterrupt), ("decode", Boom)])
@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("at", [2, 5])
def test_an_exception_inside_the_engine_frees_everything(model, monkeypatch, kind, hook, at, exc):
    engine = engine_with_blocks(model, 14)  # preemption: prefill and add also run on resume
    strategy = MAKERS[kind](engine)
    calls = raise_on_call(monkeypatch, engine, hook, at, exc)
    try:
        strategy.run(prompts_for(kind))
    except exc:
        pass
    assert calls[0] >= min(at, 1)
    assert_clean(engine)


class FakeTokenizer:
    """Just what stop strings need: decode token ids to text (each id one letter)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.mark.parametrize("kind", ["beam", "sample"])
@pytest.mark.parametrize("at", [1, 4, 17])
def test_an_exception_in_the_stop_string_check_frees_everything(model, monkeypatch, kind, at):
    tokenizer = FakeTokenizer()
    engine = engine_with_blocks(model, 14, tokenizer)
    strategy = MAKERS[kind](engine, stop=["zz", "q"])
    calls = raise_on_call(monkeypatch, tokenizer, "decode", at)
    with pytest.raises(Boom):
        strategy.run(prompts_for(kind))
    assert calls[0] == at
    assert_clean(engine)
