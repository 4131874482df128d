"""Validation of every public parameter: ValueError / TypeError naming the parameter, and a
hypothesis fuzz of the public API (valid combinations run, invalid ones raise one of those two)."""

from __future__ import annotations

import math
import numbers
import signal
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import (BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM, GPTNeoConfig,
                          GPTNeoForCausalLM, LlamaConfig, LlamaForCausalLM)

from sharedecode import BeamSearch, Engine, Greedy, KVCacheFull, ParallelSampling, SharedPromptBatch

VOCAB = 256
CONTEXT = 64
BLOCK = 8
NUM_BLOCKS = 64


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=CONTEXT, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    return LlamaForCausalLM(config).eval()


class CharTokenizer:
    """A minimal tokenizer: one token per character (ord % VOCAB)."""

    eos_token_id = None

    def __call__(self, text):
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def engine(model):
    probe = Engine(model, kv_cache_bytes=2**16, block_size=BLOCK)
    return Engine(model, kv_cache_bytes=NUM_BLOCKS * probe.layout.bytes_per_block, block_size=BLOCK)


@pytest.fixture(scope="module")
def text_engine(model):
    return Engine(model, CharTokenizer(), kv_cache_bytes=2**20, block_size=BLOCK)


def assert_clean(engine: Engine) -> None:
    engine.allocator.check()
    assert engine.kv_stats().blocks_in_use == 0


@contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging the suite) when the body runs longer than `seconds`."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"no result after {seconds} s: a hang?")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- Engine(...)
@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    (dict(block_size=0), ValueError, "block_size must be a power of two"),
    (dict(block_size=12), ValueError, "block_size must be a power of two"),
    (dict(block_size=-8), ValueError, "block_size must be a power of two"),
    (dict(block_size=True), ValueError, "block_size"),
    (dict(block_size=16.0), ValueError, "block_size"),
    (dict(block_size="16"), ValueError, "block_size"),
    (dict(backend="cuda"), ValueError, "backend must be"),
    (dict(backend=None), ValueError, "backend must be"),
    (dict(max_prefill_tokens=0), ValueError, "max_prefill_tokens"),
    (dict(max_prefill_tokens=1.5), ValueError, "max_prefill_tokens"),
    (dict(kv_cache_fraction=0.0), ValueError, "kv_cache_fraction"),
    (dict(kv_cache_fraction=1.5), ValueError, "kv_cache_fraction"),
    (dict(kv_cache_fraction=float("nan")), ValueError, "kv_cache_fraction"),
    (dict(kv_cache_bytes=0), ValueError, "kv_cache_bytes"),
    (dict(kv_cache_bytes=-1), ValueError, "kv_cache_bytes"),
    (dict(kv_cache_bytes=1.5e6), ValueError, "kv_cache_bytes"),
    (dict(kv_cache_bytes="1GB"), ValueError, "kv_cache_bytes"),
    (dict(kv_cache_bytes=100), ValueError, "smaller than one KV block"),  # too small for one sequence
    (dict(dtype="float8"), ValueError, "dtype must be one of"),
])
def test_engine_constructor_checks(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Engine(model, **kwargs)


def test_engine_rejects_a_non_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        Engine(object())
    with pytest.raises(TypeError, match="PreTrainedModel"):
        Engine(None)


@pytest.mark.parametrize("make", [
    lambda: GPTNeoForCausalLM(GPTNeoConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                                           attention_types=[[["global", "local"], 1]],
                                           max_position_embeddings=64)),
    lambda: BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)),
    lambda: FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2)),
], ids=["gpt_neo", "bloom", "falcon"])
def test_unsupported_model_type_is_named(make):
    model = make()
    assert not model._supports_attention_backend
    with pytest.raises(ValueError, match=type(model).__name__ + ".*attention interface"):
        Engine(model)


# ----------------------------------------------------------------------------- strategy parameters
BEAM_ERRORS = [
    (dict(num_beams=0), ValueError, "num_beams must be >= 1"),
    (dict(num_beams=-3), ValueError, "num_beams"),
    (dict(num_beams=2.0), TypeError, "num_beams must be an int"),
    (dict(num_beams=True), TypeError, "num_beams must be an int"),
    (dict(num_beams="4"), TypeError, "num_beams"),
    (dict(num_beams=10**12), ValueError, "num_beams must be <= 64"),
    (dict(num_beams=2, num_return_sequences=3), ValueError, "num_return_sequences must be <= num_beams"),
    (dict(num_return_sequences=0), ValueError, "num_return_sequences"),
    (dict(length_penalty="1.0"), TypeError, "length_penalty must be a number"),
    (dict(length_penalty=None), TypeError, "length_penalty must be a number"),
    (dict(length_penalty=float("nan")), TypeError, "length_penalty must be a number"),
    (dict(length_penalty=float("inf")), ValueError, "length_penalty"),
    (dict(length_penalty=True), TypeError, "length_penalty"),
    (dict(early_stopping="always"), ValueError, "early_stopping must be True, False or 'never'"),
    (dict(early_stopping=1), ValueError, "early_stopping"),
    (dict(early_stopping=0.0), ValueError, "early_stopping"),
    (dict(early_stopping=None), ValueError, "early_stopping"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=4, min_new_tokens=5), ValueError, "min_new_tokens"),
    (dict(min_new_tokens=-1), ValueError, "min_new_tokens"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(repetition_penalty=-1.0), ValueError, "repetition_penalty"),
    (dict(eos_token_id=-1), ValueError, "eos_token_id"),
    (dict(eos_token_id=VOCAB), ValueError, "eos_token_id"),
    (dict(eos_token_id=[1, 2.5]), TypeError, "eos_token_id"),
    (dict(eos_token_id=1.5), TypeError, "eos_token_id"),
    (dict(eos_token_id="2"), TypeError, "eos_token_id"),
    (dict(stop="x"), ValueError, "stop strings need a tokenizer"),
    (dict(stop=[""]), TypeError, "stop"),
    (dict(stop=5), TypeError, "stop"),
    (dict(truncate_prompt=1), TypeError, "truncate_prompt"),
    (dict(num_beams=4, num_beam_groups=3), ValueError, "num_beam_groups"),
    (dict(num_beams=4, num_beam_groups=0), ValueError, "num_beam_groups"),
    (dict(diversity_penalty=-1.0), ValueError, "diversity_penalty"),
]

SAMPLING_ERRORS = [
    (dict(n=0), ValueError, "n must be >= 1"),
    (dict(n=1.0), TypeError, "n must be an int"),
    (dict(n=False), TypeError, "n must be an int"),
    (dict(n=10**9), ValueError, "best_of must be <= 64"),
    (dict(n=3, best_of=2), ValueError, "best_of must be >= n"),
    (dict(best_of=0), ValueError, "best_of"),
    (dict(n=2, best_of=10**6), ValueError, "best_of must be <= 64"),
    (dict(temperature=-0.1), ValueError, "temperature must be in"),
    (dict(temperature=float("nan")), TypeError, "temperature must be a number"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0"),
    (dict(top_p=1.01), ValueError, "top_p"),
    (dict(top_p=-0.5), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k must be >= 0"),
    (dict(top_k=5.0), TypeError, "top_k"),
    (dict(min_p=-0.1), ValueError, r"min_p must be in \[0"),
    (dict(min_p=1.5), ValueError, "min_p"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(stop=["a", 3]), TypeError, "stop"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BEAM_ERRORS)
def test_beam_search_parameter_checks(engine, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BeamSearch(engine, **kwargs)


@pytest.mark.parametrize(("kwargs", "exc", "match"), SAMPLING_ERRORS)
def test_sampling_parameter_checks(engine, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ParallelSampling(engine, **kwargs)


def test_greedy_and_shared_prompt_checks(engine):
    with pytest.raises(ValueError, match="max_new_tokens"):
        Greedy(engine, max_new_tokens=0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        SharedPromptBatch(engine, system_prompt=[1, 2], strategy="nucleus")
    with pytest.raises(TypeError, match="strategy must be a name or a Strategy class"):
        SharedPromptBatch(engine, system_prompt=[1, 2], strategy=int)
    with pytest.raises(ValueError, match="system_prompt needs a tokenizer"):
        SharedPromptBatch(engine, system_prompt="You are kind.")
    with pytest.raises(TypeError, match="system_prompt"):
        SharedPromptBatch(engine, system_prompt=5)
    batch = SharedPromptBatch(engine, system_prompt=[1, 2], strategy="greedy", max_new_tokens=2)
    with pytest.raises(TypeError, match="user_prompts"):
        batch.run([])
    with pytest.raises(TypeError, match="user_prompts"):
        batch.run("hello")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        batch.run([[1], [VOCAB]])
    with pytest.raises(ValueError, match="prompt must not be empty"):
        SharedPromptBatch(engine, system_prompt=[], strategy="greedy").run([[1]])
    assert_clean(engine)


# ----------------------------------------------------------------------------- prompts
@pytest.mark.parametrize(("prompt", "exc", "match"), [
    ([], ValueError, "prompt must not be empty"),
    ((), ValueError, "prompt must not be empty"),
    ([[1, 2], []], ValueError, "prompt must not be empty"),
    ([1, 2.0], TypeError, "token ids must be ints"),
    ([1, "2"], TypeError, "a batch must be a list of prompts"),
    ([1, None], TypeError, "token ids must be ints"),
    ([True, 2], TypeError, "token ids must be ints"),
    ([1, -1], ValueError, r"outside the vocabulary \[0, 256\)"),
    ([1, VOCAB], ValueError, "outside the vocabulary"),
    ([10**30], ValueError, "outside the vocabulary"),
    ([[1, 2], 3], TypeError, "a batch must be a list of prompts"),
    ([[1, 2], [3, [4]]], TypeError, "token ids must be ints"),
    ([[[1]]], TypeError, "token ids must be ints"),
    (None, TypeError, "prompt must be a string or a list of token ids"),
    (5, TypeError, "prompt must be"),
    ({1: 2}, TypeError, "prompt must be"),
    (torch.tensor([[1, 2]]), TypeError, "prompt must be"),
    ("hello", ValueError, "a string prompt needs a tokenizer"),
    (["hello", "world"], ValueError, "a string prompt needs a tokenizer"),
    (list(range(60)), ValueError, "exceeds the model's context of 64 tokens"),
])
@pytest.mark.parametrize("make", [
    lambda e: BeamSearch(e, num_beams=2, max_new_tokens=5),
    lambda e: ParallelSampling(e, n=2, max_new_tokens=5),
    lambda e: Greedy(e, max_new_tokens=5),
], ids=["beam", "sample", "greedy"])
def test_prompt_checks(engine, make, prompt, exc, match):
    with pytest.raises(exc, match=match):
        make(engine).run(prompt)
    assert_clean(engine)


def test_prompt_forms_that_are_accepted(engine, text_engine):
    beam = BeamSearch(engine, num_beams=2, max_new_tokens=2)
    single = beam.run([1, 2, 3])
    assert single.prompt_token_ids == [1, 2, 3]
    assert beam.run((1, 2, 3)).sequences[0].token_ids == single.sequences[0].token_ids
    assert beam.run(torch.tensor([1, 2, 3])).sequences[0].token_ids == single.sequences[0].token_ids
    batch = beam.run([[1, 2, 3], (4, 5)])
    assert isinstance(batch, list) and len(batch) == 2
    result = Greedy(text_engine, max_new_tokens=2).run("hi")
    assert result.prompt_token_ids == [ord("h"), ord("i")]
    with pytest.raises(ValueError, match="prompt must not be empty"):
        Greedy(text_engine, max_new_tokens=2).run("")
    assert_clean(engine)


def test_truncation_only_when_asked(engine):
    prompt = list(range(100, 160))  # 60 tokens; 60 + 10 > 64
    with pytest.raises(ValueError, match="truncate_prompt=True"):
        BeamSearch(engine, num_beams=2, max_new_tokens=10).run(prompt)
    result = BeamSearch(engine, num_beams=2, max_new_tokens=10, truncate_prompt=True).run(prompt)
    assert result.prompt_token_ids == prompt[-54:]
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1 and <= 63"):  # no room for a prompt
        Greedy(engine, max_new_tokens=64, truncate_prompt=True)
    assert_clean(engine)


def test_a_budget_too_small_for_one_sequence(model):
    probe = Engine(model, kv_cache_bytes=2**16, block_size=BLOCK)
    with pytest.raises(ValueError, match="smaller than one KV block"):
        Engine(model, kv_cache_bytes=probe.layout.bytes_per_block - 1, block_size=BLOCK)
    one_block = Engine(model, kv_cache_bytes=probe.layout.bytes_per_block, block_size=BLOCK)
    with pytest.raises(KVCacheFull, match="raise kv_cache_bytes"):
        Greedy(one_block, max_new_tokens=2).run(list(range(BLOCK + 1)))
    with pytest.raises(KVCacheFull, match="raise kv_cache_bytes"):
        Greedy(one_block, max_new_tokens=4).run(list(range(BLOCK - 1)))  # the prompt fits; growing doesn't
    assert_clean(one_block)


# ----------------------------------------------------------------------------- former bugs
def test_large_length_penalty_is_rejected_not_overflowing(engine):
    with pytest.raises(ValueError, match="length_penalty"):
        BeamSearch(engine, num_beams=2, max_new_tokens=3, length_penalty=1e6)
    BeamSearch(engine, num_beams=2, max_new_tokens=3, length_penalty=100.0).run([1, 2, 3])
    assert_clean(engine)


def test_early_stopping_tensor_is_a_value_error(engine):
    with pytest.raises(ValueError, match="early_stopping"):
        BeamSearch(engine, early_stopping=torch.tensor([True, False]))


def test_seed_beyond_int64_is_a_value_error(engine):
    with pytest.raises(ValueError, match="seed"):
        ParallelSampling(engine, seed=2**64)


# ----------------------------------------------------------------------------- fuzz
def is_int(value, low, high=None) -> bool:
    return (not isinstance(value, bool) and isinstance(value, numbers.Integral)
            and value >= low and (high is None or value <= high))


def is_real(value, low, high, *, low_open=False, high_open=False) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        return False
    return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)


NASTY = [None, True, False, float("nan"), float("inf"), -float("inf"), -1, 0, 10**9, 2**70, -10**30, 1.5,
         "1", [1], (), 1e300]


VALID_PROMPTS = st.one_of(
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
    st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5), min_size=1, max_size=3),
)
BAD_PROMPTS = st.sampled_from([[], [[]], [1, -1], [1, VOCAB], [1.0], [[1], 2], "abc", None, 7, [True],
                               [[1], "ab"], list(range(CONTEXT))])


def draw_params(data, pools: dict) -> dict:
    """Every parameter from its valid values, except (in about half the examples) one to three
    drawn from NASTY or from the parameter's own invalid values."""
    corrupt = data.draw(st.one_of(st.just(set()), st.sets(st.sampled_from(sorted(pools)), min_size=1,
                                                          max_size=3)))
    params = {}
    for name, (valid, invalid) in pools.items():
        if name in corrupt:
            params[name] = data.draw(st.sampled_from(NASTY + list(invalid)), label=name)
        else:
            params[name] = data.draw(st.sampled_from(valid), label=name)
    prompt = data.draw(BAD_PROMPTS if data.draw(st.integers(0, 7)) == 0 else VALID_PROMPTS, label="prompt")
    return params, prompt


def prompt_valid(prompt, max_new_tokens) -> bool:
    nested = isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt)
    prompts = prompt if nested else [prompt]
    for p in prompts:
        if not isinstance(p, list) or not p or not all(is_int(t, 0, VOCAB - 1) for t in p):
            return False
        if len(p) + max_new_tokens > CONTEXT:
            return False
    return True


def eos_valid(eos) -> bool:
    if eos is None:
        return True
    if isinstance(eos, (list, tuple)):
        return all(is_int(t, 0, VOCAB - 1) for t in eos)
    return is_int(eos, 0, VOCAB - 1)


def check_outcome(valid: bool, run, engine) -> None:
    event("valid" if valid else "invalid")
    with time_limit(60):
        try:
            results = run()
        except (ValueError, TypeError) as error:
            assert not valid, f"valid parameters raised {error!r}"
        else:
            assert valid, "invalid parameters ran"
            for result in results if isinstance(results, list) else [results]:
                for sequence in result.sequences:
                    assert all(0 <= t < VOCAB for t in sequence.token_ids)
    assert_clean(engine)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


BEAM_POOLS = {
    "num_beams": ((1, 2, 3, 4), (65, 2.0)),
    "num_return_sequences": ((1, 2), (5,)),
    "length_penalty": ((-2.0, 0.0, 1.0, 2, 5.5), (1e7,)),
    "early_stopping": ((True, False, "never"), ("no", 2.0)),
    "max_new_tokens": ((1, 2, 3), (64,)),
    "min_new_tokens": ((0, 1, 2), (4,)),
    "repetition_penalty": ((1.0, 1.3, 0.5), (-0.5,)),
    "num_beam_groups": ((1, 2), (3,)),
    "diversity_penalty": ((0.0, 0.5), (-0.5,)),
    "eos_token_id": ((None, 3, [3, 4], []), ([3, 2.0], "3", VOCAB)),
    "truncate_prompt": ((False, True), ("yes",)),
}


@FUZZ
@given(data=st.data())
def test_fuzz_beam_search(engine, data):
    kwargs, prompt = draw_params(data, BEAM_POOLS)
    num_beams, num_return_sequences = kwargs["num_beams"], kwargs["num_return_sequences"]
    length_penalty, early_stopping = kwargs["length_penalty"], kwargs["early_stopping"]
    max_new_tokens, min_new_tokens = kwargs["max_new_tokens"], kwargs["min_new_tokens"]
    repetition_penalty, num_beam_groups = kwargs["repetition_penalty"], kwargs["num_beam_groups"]
    diversity_penalty, eos_token_id = kwargs["diversity_penalty"], kwargs["eos_token_id"]
    truncate_prompt = kwargs["truncate_prompt"]
    if max_new_tokens is None:
        max_new_tokens = 20  # the default
    early_ok = early_stopping is True or early_stopping is False or early_stopping == "never"
    valid = (
        early_ok and is_int(num_beams, 1, NUM_BLOCKS) and is_int(num_return_sequences, 1, num_beams)
        and is_real(length_penalty, -100.0, 100.0)
        and is_int(max_new_tokens, 1, CONTEXT - 1) and is_int(min_new_tokens, 0, max_new_tokens)
        and is_real(repetition_penalty, 0, math.inf, low_open=True, high_open=True)
        and is_int(num_beam_groups, 1, num_beams) and num_beams % num_beam_groups == 0
        and is_real(diversity_penalty, 0, math.inf, high_open=True)
        and eos_valid(eos_token_id) and isinstance(truncate_prompt, bool)
        and prompt_valid(prompt, max_new_tokens))
    check_outcome(valid, lambda: BeamSearch(engine, **kwargs).run(prompt), engine)


SAMPLING_POOLS = {
    "n": ((1, 2, 3), (2.0,)),
    "best_of": ((None, 3, 4), (65,)),
    "temperature": ((0.0, 0.7, 1.0, 2, 1e-6), (-0.5,)),
    "top_k": ((0, 1, 5, 10**9), (-2, 5.0)),
    "top_p": ((1.0, 0.9, 1e-9), (1.5, 0.0)),
    "min_p": ((0.0, 0.1, 1.0), (1.5, -0.1)),
    "repetition_penalty": ((1.0, 1.2), (0.0,)),
    "seed": ((None, 0, 7, 2**32), (-5, 2**64)),
    "max_new_tokens": ((1, 2, 3), (64,)),
    "min_new_tokens": ((0, 1), (5,)),
    "eos_token_id": ((None, 5, [5, 6]), ([5, None],)),
}


@FUZZ
@given(data=st.data())
def test_fuzz_parallel_sampling(engine, data):
    kwargs, prompt = draw_params(data, SAMPLING_POOLS)
    n, best_of, temperature, top_k = kwargs["n"], kwargs["best_of"], kwargs["temperature"], kwargs["top_k"]
    top_p, min_p, repetition_penalty = kwargs["top_p"], kwargs["min_p"], kwargs["repetition_penalty"]
    seed, max_new_tokens, min_new_tokens = kwargs["seed"], kwargs["max_new_tokens"], kwargs["min_new_tokens"]
    eos_token_id = kwargs["eos_token_id"]
    if max_new_tokens is None:
        max_new_tokens = 20  # the default
    width = best_of if best_of is not None else n
    valid = (
        is_int(n, 1) and (best_of is None or is_int(best_of, n)) and is_int(width, 1, NUM_BLOCKS)
        and is_real(temperature, 0, math.inf, high_open=True) and is_int(top_k, 0)
        and is_real(top_p, 0, 1, low_open=True) and is_real(min_p, 0, 1)
        and is_real(repetition_penalty, 0, math.inf, low_open=True, high_open=True)
        and (seed is None or is_int(seed, 0, 2**63 - 1)) and is_int(max_new_tokens, 1, CONTEXT - 1)
        and is_int(min_new_tokens, 0, max_new_tokens) and eos_valid(eos_token_id)
        and prompt_valid(prompt, max_new_tokens))
    check_outcome(valid, lambda: ParallelSampling(engine, **kwargs).run(prompt), engine)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.one_of(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10), st.just([]),
                        st.just(5)),
       users=st.one_of(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4), min_size=1, max_size=4),
                       st.sampled_from([[], [[]], [[VOCAB]], "x", [[1], 3]])),
       strategy=st.sampled_from(["greedy", "beam", "sample", "bogus"]))
def test_fuzz_shared_prompt_batch(engine, system, users, strategy):
    def run():
        params = {"beam": dict(num_beams=2), "sample": dict(n=2, seed=0)}.get(strategy, {})
        return SharedPromptBatch(engine, system_prompt=system, strategy=strategy, max_new_tokens=2,
                                 **params).run(users)

    valid = (strategy != "bogus" and isinstance(system, list) and bool(system) and isinstance(users, list)
             and bool(users) and all(isinstance(u, list) and u and all(is_int(t, 0, VOCAB - 1) for t in u)
                                     for u in users))
    check_outcome(valid, run, engine)
