"""Prefill chunks through the CUDA-graph path's static buffers (prefill_graphs.py): the padded
forward gives the unpadded one's logits and writes the same keys and values, nothing more.

Engines run the triton backend on CPU through the Triton interpreter; the graph's forward runs
eagerly on its static buffers (the capture itself is GPU-only: bench/check_decode_gpu.py).
"""
import pytest
import torch

from sharedecode import Engine
from sharedecode.cuda_graphs import DecodeGraphs
from sharedecode.prefill_graphs import PrefillGraphs, PrefillKey, token_bucket
from sharedecode.strategies import Greedy
from test_shared_prefix_engine import BLOCK, VOCAB, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


class UncapturedPrefillGraphs(PrefillGraphs):
    """The graph path's staging and padded forward, run eagerly instead of captured and replayed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys = []

    def _replay(self, key):
        self.keys.append(key)
        with torch.inference_mode(), self.decode_graphs.model_swaps():
            return self._forward(key).clone()


def graph_engine(model, max_tokens=128, **kwargs) -> Engine:
    engine = Engine(model, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20, **kwargs)
    graphs = DecodeGraphs(engine, max_batch=16, max_context=128, fuse_projections=False)
    engine.prefill_graphs = UncapturedPrefillGraphs(engine, graphs, max_tokens=max_tokens)
    return engine


def test_token_buckets_and_keys(model):
    assert [token_bucket(n) for n in (1, 16, 17, 32, 33, 64, 65, 512, 513)] == \
        [16, 16, 32, 32, 64, 64, 128, 512, 576]
    graphs = graph_engine(model).prefill_graphs
    assert graphs.key(87, 2, 2, 7) == PrefillKey(128, 2, 2, True)
    assert graphs.key(64, 1, 1, 8) == PrefillKey(64, 1, 1, False)  # no padding sequence
    assert graphs.key(129, 1, 1, 17) is None  # longer than the graphs' largest bucket
    assert graphs.key(40, 17, 17, 2) is None  # more sequences than the buffers hold
    assert graphs.key(30, 1, 1, graphs.max_blocks + 1) is None  # a table wider than the buffer
    assert graphs.key(16, 16, 16, 1) is None  # one token per sequence: a decode batch to the kernels
    assert graphs.key(15, 15, 15, 1) is None  # ... also with the padding sequence (16 tokens, 16 seqs)
    assert graphs.key(16, 15, 15, 1) == PrefillKey(16, 15, 15, False)
    graphs.graphs = {PrefillKey(64, 1, 1, True): None}
    graphs.max_graphs = 1
    assert graphs.key(40, 1, 1, 5) == PrefillKey(64, 1, 1, True)  # captured already
    assert graphs.key(70, 1, 1, 9) is None  # a new graph past the bound: eager


@pytest.mark.parametrize("lengths,cached", [((37, 50), False), ((64,), False), ((5, 9, 3), False),
                                            ((45, 45), True)])
def test_padded_prefill_matches_the_eager_one(model, lengths, cached):
    """Logits and the KV pool after the padded forward equal the eager prefill's; `cached`: the
    second prompt shares the first's leading blocks (a suffix prefill after cached blocks)."""
    torch.manual_seed(1)
    base = torch.randint(3, VOCAB, (max(lengths),)).tolist()
    prompts = [base[:n] if cached else torch.randint(3, VOCAB, (n,)).tolist() for n in lengths]
    if cached:
        prompts[1] = prompts[0][:32] + torch.randint(3, VOCAB, (13,)).tolist()
    eager = Engine(model, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20)
    graphed = graph_engine(model)
    results = []
    for engine in (eager, graphed):
        tables = [engine.add(prompts[0])]
        if cached:  # the first prompt's blocks computed and cached before the second comes
            first = engine.prefill(tables)
            tables.append(engine.add(prompts[1]))
            assert tables[1].num_cached_tokens == 32
            logits = torch.cat([first, engine.prefill(tables[1:])])
        else:
            tables += [engine.add(p) for p in prompts[1:]]
            logits = engine.prefill(tables)
        results.append((logits, engine.pool.tensor.clone()))
    keys = graphed.prefill_graphs.keys
    assert [k.seqs for k in keys] == ([1, 1] if cached else [len(lengths)])
    assert [k.padded for k in keys] == [sum(lengths) % 64 != 0] if not cached else [True, True]
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    # the same keys and values in the same slots, and the padding tokens wrote nowhere (the pool
    # starts zeroed: every slot outside the prompts' is still zero in both)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-4)


def test_engine_prefills_through_the_graph_path_and_matches_hf(model):
    """Greedy generation whose prefill takes the graph path gives HF generate's tokens."""
    engine = graph_engine(model)
    prompts = [torch.randint(3, VOCAB, (n,)).tolist() for n in (21, 40)]
    out = Greedy(engine, max_new_tokens=6, min_new_tokens=6).run(prompts)
    assert engine.prefill_graphs.keys, "the prefill did not take the graph path"
    for prompt, result in zip(prompts, out):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                  min_new_tokens=6, pad_token_id=0)[0, len(prompt):].tolist()
        assert result.sequences[0].token_ids == expected


def test_long_chunks_and_other_engines_keep_the_eager_prefill(model):
    engine = graph_engine(model, max_tokens=64)
    prompt = torch.randint(3, VOCAB, (100,)).tolist()
    reference = Engine(model, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20)
    logits = engine.prefill([engine.add(prompt)])
    assert engine.prefill_graphs.keys == []  # 100 tokens > the largest bucket (64): eager
    torch.testing.assert_close(logits, reference.prefill([reference.add(prompt)]))
    assert Engine(model, backend="triton", kv_cache_bytes=2**20).prefill_graphs is None  # no CUDA


def test_a_forward_that_cannot_be_captured_falls_back_to_the_eager_prefill(model):
    class Failing(UncapturedPrefillGraphs):
        def _replay(self, key):
            super()._replay(key)
            raise RuntimeError("operation not permitted when stream is capturing")

    engine = graph_engine(model)
    graphs = engine.prefill_graphs = Failing(engine, engine.prefill_graphs.decode_graphs, max_tokens=128)
    prompt = torch.randint(3, VOCAB, (40,)).tolist()
    reference = Engine(model, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20)
    with pytest.warns(RuntimeWarning, match="a prefill graph failed"):
        logits = engine.prefill([engine.add(prompt)])
    torch.testing.assert_close(logits, reference.prefill([reference.add(prompt)]))
    assert len(graphs.keys) == 1 and graphs.key(40, 1, 1, 5) is None  # off from now on
    engine.free_all()
    engine.prefill([engine.add(prompt[:30])])
    assert len(graphs.keys) == 1


def test_chunked_prompts_keep_no_logits_in_their_first_chunks(model):
    """With a small chunk budget a prompt spans several graph chunks, the first ones keeping no
    logits; the result is the eager prefill's."""
    engine = graph_engine(model, max_prefill_tokens=24)
    reference = Engine(model, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20, max_prefill_tokens=24)
    prompts = [torch.randint(3, VOCAB, (n,)).tolist() for n in (50, 9)]
    logits = engine.prefill([engine.add(p) for p in prompts])
    torch.testing.assert_close(logits, reference.prefill([reference.add(p) for p in prompts]),
                               rtol=1e-4, atol=1e-4)
    assert [k.kept for k in engine.prefill_graphs.keys] == [0, 0, 2]  # 24 + 24 + (2 + 9) tokens
    torch.testing.assert_close(engine.pool.tensor, reference.pool.tensor, rtol=1e-4, atol=1e-4)
