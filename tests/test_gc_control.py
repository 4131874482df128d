"""Full garbage collections are postponed while a generation runs, and only then."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sharedecode.engine import Engine
from sharedecode.gc_control import NO_FULL_COLLECTION, full_collections_postponed
from sharedecode.strategies import Greedy


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return Engine(LlamaForCausalLM(config).eval(), backend="torch", kv_cache_bytes=2**20)


def test_nested_uses_restore_the_thresholds_once_at_the_outermost_exit():
    before = gc.get_threshold()
    with full_collections_postponed():
        assert gc.get_threshold() == (before[0], before[1], NO_FULL_COLLECTION)
        with full_collections_postponed():
            pass
        assert gc.get_threshold()[2] == NO_FULL_COLLECTION  # the inner exit leaves the outer's setting
    assert gc.get_threshold() == before


def test_an_exception_restores_the_thresholds():
    before = gc.get_threshold()
    with pytest.raises(RuntimeError):
        with full_collections_postponed():
            raise RuntimeError("boom")
    assert gc.get_threshold() == before


def test_a_generation_postpones_full_collections_while_it_runs(engine):
    before = gc.get_threshold()
    strategy = Greedy(engine, max_new_tokens=4)
    seen = [gc.get_threshold()[2] for _ in strategy.stream([1, 2, 3])]
    assert seen and all(t == NO_FULL_COLLECTION for t in seen)
    assert gc.get_threshold() == before
    strategy.run([1, 2, 3])
    assert gc.get_threshold() == before


def test_a_stream_stopped_early_restores_the_thresholds(engine):
    before = gc.get_threshold()
    stream = Greedy(engine, max_new_tokens=8).stream([1, 2, 3])
    next(stream)
    assert gc.get_threshold()[2] == NO_FULL_COLLECTION
    stream.close()
    assert gc.get_threshold() == before
    assert engine.allocator.num_blocks_in_use == 0
