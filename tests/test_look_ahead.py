"""The scheduler's look-ahead (the next step launched before this step's results are read) gives
the tokens of stepping one at a time, frees every block, and really runs ahead. Scores agree to
float rounding: a row kept one step longer changes the batch, and a batch's composition moves a
GEMM's last bits (as any other request sharing the batch does).

Sampling and greedy on a tiny random Llama (CPU, torch backend), with EOS likely enough that
sequences stop at different steps (seen one step late ahead), best_of > n, seeds, minimum
lengths, several requests, and a cache small enough to force the fallback.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sharedecode.engine import Engine
from sharedecode.scheduler import Scheduler
from sharedecode.strategies import Greedy, ParallelSampling

VOCAB = 64
EOS = [2, 3]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=EOS, bos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
        model.lm_head.weight[EOS[0]].mul_(2.0)  # EOS likely at some steps
    return model


def run(make, prompts, look_ahead: bool, calls: list | None = None, kv_bytes: int = 2**20,
        reused: list | None = None):
    """`make(engine)` -> strategy, on a fresh engine (a reused one would reuse cached prompt blocks,
    whose logits differ in the last bits from recomputed ones). `reused`: the decodes' logits
    are handed out as the captured step's output buffer would be when the caller allows it
    (`reuse_output`), and poisoned with NaN at the next decode, as the next replay overwrites them;
    each decode's reuse_output is appended."""
    engine = Engine(make.model, backend="torch", block_size=4, kv_cache_bytes=kv_bytes, look_ahead=look_ahead)
    strategy = make(engine)
    original = engine.decode
    handed_out: list[torch.Tensor] = []

    def decode(tables, tokens, input_ids=None, reuse_output=False):
        if calls is not None:
            calls.append(input_ids is not None)
        with torch.inference_mode():  # (the engine's forwards make inference tensors)
            for buffer in handed_out:
                buffer.fill_(float("nan"))
        handed_out.clear()
        out = original(tables, tokens, input_ids)
        if reused is not None:
            reused.append(reuse_output)
            if reuse_output:
                handed_out.append(out)
        return out

    engine.decode = decode
    results = strategy.run(prompts)
    assert engine.kv_stats().blocks_in_use == 0
    return [[(s.token_ids, s.finish_reason, s.score) for s in r.sequences] for r in results]


def assert_same(ahead, stepped):
    assert [[s[:2] for s in r] for r in ahead] == [[s[:2] for s in r] for r in stepped]
    for r, q in zip(ahead, stepped):
        assert [s[2] for s in r] == pytest.approx([s[2] for s in q], rel=1e-6)


def maker(model, cls, **params):
    make = functools.partial(cls, **params)
    make.model = model
    return make


def prompts_for(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(count)]


@pytest.mark.parametrize("seed", range(12))
def test_sampling_ahead_gives_the_results_of_stepping_one_at_a_time(model, seed):
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    max_new_tokens = rng.randint(1, 24)
    make = maker(model, ParallelSampling, n=n, best_of=n + rng.randint(0, 2), temperature=rng.choice([0.7, 1.0, 1.3]),
                 top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 20]), seed=seed,
                 max_new_tokens=max_new_tokens, min_new_tokens=rng.randint(0, min(3, max_new_tokens)),
                 eos_token_id=EOS)
    prompts = prompts_for(seed, rng.randint(1, 4))
    calls: list[bool] = []
    ahead = run(make, prompts, True, calls)
    assert_same(ahead, run(make, prompts, False))
    if max_new_tokens >= 3:
        assert any(calls), "no step was launched ahead"


def test_greedy_ahead_with_stops_at_different_steps(model):
    make = maker(model, Greedy, max_new_tokens=30, eos_token_id=EOS)
    prompts = prompts_for(99, 12)
    calls: list[bool] = []
    ahead = run(make, prompts, True, calls)
    assert_same(ahead, run(make, prompts, False))
    reasons = {r[0][1] for r in ahead}
    assert reasons == {"eos", "length"} and sum(calls) > 10  # stops seen one step late, and ahead


@pytest.mark.parametrize("look_ahead", [True, False])
def test_logits_handed_out_as_the_graph_buffer_are_read_before_the_next_decode(model, look_ahead):
    # Engine.decode(reuse_output=True) may return the captured step's output buffer (no copy),
    # which the next step's replay overwrites: the scheduler asks for it only when every request
    # reads its logits on the device at once. Here the next decode poisons them: a later read
    # would show as a different (NaN-driven) result.
    make = maker(model, ParallelSampling, n=3, best_of=4, temperature=1.0, top_p=0.9, seed=11,
                 max_new_tokens=16, eos_token_id=EOS)
    prompts = prompts_for(21, 3)
    reused: list[bool] = []
    got = run(make, prompts, look_ahead, reused=reused)
    assert_same(got, run(make, prompts, look_ahead))
    assert reused and all(reused)
    greedy = maker(model, Greedy, max_new_tokens=12, eos_token_id=EOS)
    reused.clear()
    assert_same(run(greedy, prompts, look_ahead, reused=reused), run(greedy, prompts, look_ahead))
    assert reused and all(reused)


def test_reads_logits_at_once_only_for_requests_with_a_device_part():
    from sharedecode.scheduler import Request, reads_logits_at_once
    from sharedecode.strategies.beam_search import BeamRequest
    from sharedecode.strategies.diverse_beam_search import DiverseBeamRequest
    from sharedecode.strategies.sampling import SampleRequest

    def bare(cls):
        return cls.__new__(cls)

    assert reads_logits_at_once([bare(SampleRequest), bare(BeamRequest)])
    assert not reads_logits_at_once([bare(SampleRequest), bare(DiverseBeamRequest)])
    assert not reads_logits_at_once([bare(Request)])


def test_a_full_cache_falls_back_to_stepping_and_preempting(model):
    # room for the prompts but not for every sequence to grow: look-ahead meets KVCacheFull and
    # the ordinary step preempts
    per_block = Engine(model, backend="torch", block_size=4, kv_cache_bytes=2**20).layout.bytes_per_block
    make = maker(model, ParallelSampling, n=4, temperature=1.0, seed=3, max_new_tokens=20, min_new_tokens=20)
    prompts = prompts_for(5, 3)
    calls: list[bool] = []
    ahead = run(make, prompts, True, calls, kv_bytes=per_block * 40)
    assert_same(ahead, run(make, prompts, False, kv_bytes=per_block * 40))
    assert any(calls)


def test_no_look_ahead_with_a_repetition_penalty(model):
    calls: list[bool] = []
    run(maker(model, Greedy, max_new_tokens=8, repetition_penalty=1.3), prompts_for(1, 2), True, calls)
    assert calls and not any(calls)


def test_look_ahead_option_is_validated_and_off_by_default_on_the_cpu(model):
    with pytest.raises(TypeError, match="look_ahead"):
        Engine(model, backend="torch", block_size=4, kv_cache_bytes=2**20, look_ahead="yes")
    assert Engine(model, backend="torch", block_size=4, kv_cache_bytes=2**20).look_ahead is False
    engine = Engine(model, backend="torch", block_size=4, kv_cache_bytes=2**20, look_ahead=False)
    assert Scheduler(engine).look_ahead is False and Scheduler(engine, look_ahead=True).look_ahead
    with pytest.raises(TypeError, match="look_ahead"):
        Scheduler(engine, look_ahead="yes")


@pytest.mark.parametrize("at", [1, 3, 6])
@pytest.mark.parametrize("where", ["step_host", "decode"])
def test_an_exception_with_a_step_in_flight_frees_everything(model, monkeypatch, at, where):
    from sharedecode.strategies.sampling import SampleRequest

    engine = Engine(model, backend="torch", block_size=4, kv_cache_bytes=2**20, look_ahead=True)
    strategy = ParallelSampling(engine, n=3, temperature=1.0, seed=0, max_new_tokens=12, min_new_tokens=12)
    owner, name = (SampleRequest, "step_host") if where == "step_host" else (engine, "decode")
    original = getattr(owner, name)
    calls, ahead = [0], []
    in_flight = [None]  # the step launched ahead while _finish reads the one before

    def failing(*args, **kwargs):
        calls[0] += 1
        ahead.append(in_flight[0] is not None)
        if calls[0] == at:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    original_finish = Scheduler._finish

    def finish(self, step, ahead_step=None):
        in_flight[0] = ahead_step
        return original_finish(self, step, ahead_step)

    monkeypatch.setattr(Scheduler, "_finish", finish)
    monkeypatch.setattr(owner, name, failing)
    with pytest.raises(RuntimeError, match="boom"):
        strategy.run(prompts_for(3, 2))
    assert engine.kv_stats().blocks_in_use == 0
    if where == "step_host" and at > 2:
        assert ahead[-1]  # the failure came while a step launched ahead was queued


def test_stopping_a_stream_with_a_step_in_flight_frees_everything(model):
    engine = Engine(model, backend="torch", block_size=4, kv_cache_bytes=2**20, look_ahead=True)
    strategy = Greedy(engine, max_new_tokens=20, min_new_tokens=20)
    for count, _ in enumerate(strategy.stream(prompts_for(4, 3))):
        if count == 4:
            break
    assert engine.kv_stats().blocks_in_use == 0


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 9])
def test_no_step_is_wasted_when_no_sequence_can_stop_early(model, max_new_tokens):
    # EOS banned for the whole run: every launched step is needed, so look-ahead launches exactly
    # the steps stepping one at a time does (the last one only when it is still needed)
    make = maker(model, ParallelSampling, n=3, temperature=1.0, seed=2, max_new_tokens=max_new_tokens,
                 min_new_tokens=max_new_tokens, eos_token_id=EOS)
    ahead_calls, stepped_calls = [], []
    ahead = run(make, prompts_for(8, 3), True, ahead_calls)
    assert_same(ahead, run(make, prompts_for(8, 3), False, stepped_calls))
    assert len(ahead_calls) == len(stepped_calls) == max_new_tokens - 1
    assert sum(ahead_calls) == max(0, max_new_tokens - 2)


# ---------------------------------------------------------------- beam search launched ahead
def beam_run(model, prompts, look_ahead: bool, kv_bytes: int = 2**20, **params):
    """Beam search on a fresh engine; returns the results and how many steps were forked ahead."""
    from sharedecode.strategies import BeamSearch

    engine = Engine(model, backend="torch", block_size=4, kv_cache_bytes=kv_bytes, look_ahead=look_ahead)
    forked = []
    original = engine.decode_forked

    def decode_forked(*args, **kwargs):
        forked.append(len(args[2]))
        engine.allocator.check()  # the reserved tails are held, by no table
        return original(*args, **kwargs)

    engine.decode_forked = decode_forked
    results = BeamSearch(engine, **params).run(prompts)
    assert engine.kv_stats().blocks_in_use == 0 and not engine.allocator.reserved
    engine.allocator.check()
    return [[(s.token_ids, s.finish_reason, s.score) for s in r.sequences] for r in results], forked


@pytest.mark.parametrize("seed", range(10))
def test_beam_search_ahead_gives_the_results_of_stepping_one_at_a_time(model, seed):
    """The survivors chosen on the device, their tables made on the device and mirrored by the
    host a step later: the same beams and scores (bit for bit: the batch is the same) as stepping,
    with searches that end early (EOS, early stopping) discarding their step launched ahead."""
    rng = random.Random(seed)
    num_beams = rng.randint(2, 5)
    max_new_tokens = rng.randint(1, 16)
    params = dict(num_beams=num_beams, max_new_tokens=max_new_tokens,
                  min_new_tokens=rng.randint(0, min(3, max_new_tokens)),
                  length_penalty=rng.choice([1.0, 0.0, 2.0, -1.0]),
                  early_stopping=rng.choice([True, False, "never"]),
                  num_return_sequences=rng.randint(1, num_beams), eos_token_id=EOS)
    prompts = prompts_for(seed, rng.randint(1, 4))
    ahead, forked = beam_run(model, prompts, True, **params)
    assert ahead == beam_run(model, prompts, False, **params)[0]
    if max_new_tokens >= 4:
        assert forked, "no step was launched ahead"


def test_beam_search_ahead_without_room_falls_back_to_stepping(model):
    # room for the beams to grow but not always for a whole step's reserved blocks on top
    per_block = Engine(model, backend="torch", block_size=4, kv_cache_bytes=2**20).layout.bytes_per_block
    params = dict(num_beams=4, max_new_tokens=14, min_new_tokens=14, eos_token_id=EOS)
    prompts = prompts_for(11, 3)
    ahead, forked = beam_run(model, prompts, True, kv_bytes=per_block * 36, **params)
    assert ahead == beam_run(model, prompts, False, kv_bytes=per_block * 36, **params)[0]
    assert forked


def test_no_beam_look_ahead_with_stop_strings_or_a_penalty(model):
    from sharedecode.strategies import BeamSearch

    _, forked = beam_run(model, prompts_for(2, 2), True, num_beams=3, max_new_tokens=8, repetition_penalty=1.2)
    assert not forked
    engine = Engine(model, backend="torch", block_size=4, kv_cache_bytes=2**20, look_ahead=True)
    request = BeamSearch(engine, num_beams=3, max_new_tokens=8).make_request([5, 6, 7])
    request.steps_in_flight = 1
    assert request.can_look_ahead()
    request.rule.stop_strings = ["x"]  # (stop strings need each beam's text on the host)
    assert not request.can_look_ahead()
    request.rule.stop_strings = []
    request.num_generated = 7  # the step in flight makes the 8th token: it ends the search
    assert not request.can_look_ahead()


@pytest.mark.parametrize("at", [1, 4, 11])
@pytest.mark.parametrize("where", ["step_host", "mirror"])
def test_an_exception_with_beams_in_flight_frees_everything(model, monkeypatch, at, where):
    """A failure in the host's step while a step launched ahead is queued, or halfway through the
    host's copy of the device's tables (some parents already continued in place, some siblings
    forked): every table and reserved block is given back."""
    from sharedecode.block_allocator import BlockAllocator
    from sharedecode.strategies import BeamSearch
    from sharedecode.strategies.beam_search import BeamRequest

    engine = Engine(model, backend="torch", block_size=4, kv_cache_bytes=2**20, look_ahead=True)
    owner, name = (BeamRequest, "_step_launched_ahead") if where == "step_host" else (BlockAllocator, "take_tail")
    original = getattr(owner, name)
    calls = [0]

    def failing(self, *args):
        calls[0] += 1
        if calls[0] == at:
            raise RuntimeError("boom")
        return original(self, *args)

    monkeypatch.setattr(owner, name, failing)
    with pytest.raises(RuntimeError, match="boom"):
        BeamSearch(engine, num_beams=4, max_new_tokens=12, min_new_tokens=12).run(prompts_for(9, 2))
    assert engine.kv_stats().blocks_in_use == 0 and not engine.allocator.reserved
    engine.allocator.check()


def test_stopping_a_beam_stream_with_a_step_in_flight_frees_everything(model):
    from sharedecode.strategies import BeamSearch

    engine = Engine(model, backend="torch", block_size=4, kv_cache_bytes=2**20, look_ahead=True)
    strategy = BeamSearch(engine, num_beams=4, max_new_tokens=20, min_new_tokens=20)
    forked = []
    original = engine.decode_forked
    engine.decode_forked = lambda *a, **kw: forked.append(1) or original(*a, **kw)
    for count, _ in enumerate(strategy.stream(prompts_for(12, 2))):
        if count == 6:
            assert forked  # (the step in flight was launched ahead; its tables are mirrored)
            break
    assert engine.kv_stats().blocks_in_use == 0 and not engine.allocator.reserved
    engine.allocator.check()
