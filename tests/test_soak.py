"""Soak: 5,000 mixed requests (beam search, seeded sampling, shared-prefix batches) through one engine
with a modest KV budget (so that admission waits and preemption happen): no block leaks, and the
Python heap does not grow from the first third of the runs to the last."""

from __future__ import annotations

import gc
import time
import tracemalloc

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sharedecode import BeamSearch, Engine, ParallelSampling, SharedPromptBatch

VOCAB = 256
BLOCK = 4
TOTAL_REQUESTS = 5000
PER_RUN = 250
NUM_BLOCKS = 200


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    return LlamaForCausalLM(config).eval()


def make_run(engine: Engine, index: int):
    """Run `index`'s strategy and prompts: beam, sampling and shared prefix in turn."""
    g = torch.Generator().manual_seed(index)
    lengths = torch.randint(1, 7, (PER_RUN,), generator=g).tolist()
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    kind = index % 3
    if kind == 0:
        strategy = BeamSearch(engine, num_beams=2 + index % 2, max_new_tokens=6, eos_token_id=[0, 1])
        return "beam", lambda: strategy.run(prompts)
    if kind == 1:
        strategy = ParallelSampling(engine, n=3, seed=index, top_k=20, max_new_tokens=6, eos_token_id=[0, 1])
        return "sample", lambda: strategy.run(prompts)
    system = torch.randint(0, VOCAB, (BLOCK * 2 + 3,), generator=g).tolist()
    batch = SharedPromptBatch(engine, system_prompt=system, strategy="sample" if index % 2 else "greedy",
                              max_new_tokens=3, eos_token_id=[0, 1], **({"n": 2, "seed": 0} if index % 2 else {}))
    return "shared", lambda: batch.run(prompts)


@pytest.mark.slow
def test_soak_5000_mixed_requests_no_leaks_bounded_memory():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_llama()
        probe = Engine(model, kv_cache_bytes=2**16, block_size=BLOCK)
        engine = Engine(model, kv_cache_bytes=NUM_BLOCKS * probe.layout.bytes_per_block, block_size=BLOCK,
                        max_prefill_tokens=512)
        runs = TOTAL_REQUESTS // PER_RUN
        third = runs // 3
        done = 0
        preemptions = 0
        reused = 0
        kinds = set()
        heap_after_first_third = None
        start = time.perf_counter()
        tracemalloc.start()
        for index in range(runs):
            kind, run = make_run(engine, index)
            results = run()
            assert len(results) == PER_RUN
            assert all(r.sequences for r in results)
            preemptions += results[0].stats.preemptions
            reused += results[0].stats.prefill_tokens_reused
            kinds.add(kind)
            done += len(results)
            del results, run
            stats = engine.kv_stats()
            assert stats.blocks_in_use == 0 and stats.num_sequences == 0, (index, stats)
            if index == third - 1:
                gc.collect()
                heap_after_first_third = tracemalloc.get_traced_memory()[0]
        gc.collect()
        heap_at_end = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        engine.allocator.check()
        assert done == TOTAL_REQUESTS
        assert kinds == {"beam", "sample", "shared"}
        assert preemptions > 0, "the budget should make the scheduler preempt"
        assert reused > 0, "shared prefixes should be reused"
        growth = heap_at_end - heap_after_first_third
        assert growth < 512 * 1024, f"Python heap grew by {growth} bytes over the last two thirds"
        print(f"soak: {done} requests, {preemptions} preemptions, heap growth {growth} B, "
              f"{time.perf_counter() - start:.1f} s")
    finally:
        torch.set_num_threads(threads)
