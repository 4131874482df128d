"""The engine against each model's own Hugging Face forward (eager attention, full sequence).

Tiny random fp32 models of every architecture the engine supports run prefill (plain, chunked, and
reusing cached prefix blocks) and decode steps (with forks, so copy-on-write) on the paged cache;
the logits of every step must match the model's own forward on the whole sequence.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers

from sharedecode.embedded import EMBEDDED_MODEL_DIR
from sharedecode.engine import Engine

BLOCK = 8
WINDOW = 8  # sliding window of the models that have one: as small as a block, so that it matters
VOCAB = 96
RTOL = 1e-4

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)


def _llama():
    return transformers.LlamaConfig(**COMMON, head_dim=8)


def _mistral():
    return transformers.MistralConfig(**COMMON, head_dim=8, sliding_window=WINDOW)


def _qwen2():
    # layer 0 full, layer 1 sliding
    return transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                    max_window_layers=1)


def _qwen3():
    return transformers.Qwen3Config(**COMMON, head_dim=8)


def _phi3():
    return transformers.Phi3Config(**COMMON, sliding_window=WINDOW)


def _gemma2():
    # layers alternate sliding / full; small caps so that the tanh is far from linear; a scaling
    # that is not head_dim ** -0.5
    return transformers.Gemma2Config(**{**COMMON, "num_hidden_layers": 3}, head_dim=8,
                                     query_pre_attn_scalar=16, sliding_window=WINDOW,
                                     attn_logit_softcapping=1.0, final_logit_softcapping=2.0)


def _gemma3():
    # interleaved sliding layers; Gemma-3 passes no attention softcap (its eager path neither)
    return transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=8, query_pre_attn_scalar=16,
        sliding_window=WINDOW, attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])


def _gpt2():
    # scale_attn_by_inverse_layer_idx: a per-layer scaling that the attention must take as given
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                   initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                                   scale_attn_by_inverse_layer_idx=True)


def _olmo2():
    return transformers.Olmo2Config(**COMMON)


ARCHS = {
    "llama": (_llama, transformers.LlamaForCausalLM),
    "mistral": (_mistral, transformers.MistralForCausalLM),
    "qwen2": (_qwen2, transformers.Qwen2ForCausalLM),
    "qwen3": (_qwen3, transformers.Qwen3ForCausalLM),
    "phi3": (_phi3, transformers.Phi3ForCausalLM),
    "gemma2": (_gemma2, transformers.Gemma2ForCausalLM),
    "gemma3": (_gemma3, transformers.Gemma3ForCausalLM),
    "gpt2": (_gpt2, transformers.GPT2LMHeadModel),
    "olmo2": (_olmo2, transformers.Olmo2ForCausalLM),
}


def make_model(arch: str, seed: int = 0):
    make_config, cls = ARCHS[arch]
    config = make_config()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    assert model.config._attn_implementation == "eager"
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(request):
    return request.param, make_model(request.param)


def reference_logits(model, token_ids: list[int]) -> torch.Tensor:
    """The model's own forward (eager attention) over the whole sequence: [len, V] fp32."""
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids]), use_cache=False).logits[0].float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), what
    err = (actual - expected).abs().max().item() / expected.abs().max().item()
    assert err <= RTOL, f"{what}: relative error {err:.3g} > {RTOL}"


def prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def check_steps(engine, model, tables, sequences, steps, seed):
    """Run `steps` decode steps on `tables` (whose full token lists are `sequences`), checking each."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        tokens = torch.randint(3, VOCAB, (len(tables),), generator=g).tolist()
        logits = engine.decode(tables, tokens)
        assert logits.shape == (len(tables), VOCAB)
        for i, (seq, token) in enumerate(zip(sequences, tokens)):
            seq.append(token)
            assert tables[i].token_ids == seq
            assert_close(logits[i], reference_logits(model, seq)[-1], f"decode step {step}, seq {i}")
        engine.allocator.check()


# ------------------------------------------------------------------------------ logits vs HF
@pytest.mark.parametrize("max_prefill_tokens", [4096, 5])
def test_prefill_and_decode_match_hf(arch_model, max_prefill_tokens):
    arch, model = arch_model
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**22, max_prefill_tokens=max_prefill_tokens)
    assert engine.backend == "torch"
    # shorter than a block, exactly one block, longer than a block and the window, several blocks
    lengths = [3, 8, 13, 21] if max_prefill_tokens > 5 else [3, 13, 21]
    seqs = prompts(1, lengths)
    tables = [engine.add(p) for p in seqs]
    assert all(t.num_cached_tokens == 0 for t in tables)
    logits = engine.prefill(tables)
    assert logits.shape == (len(seqs), VOCAB)
    for i, p in enumerate(seqs):
        assert_close(logits[i], reference_logits(model, p)[-1], f"{arch} prefill of {len(p)} tokens")
    # decode across block boundaries and past the window
    check_steps(engine, model, tables, [list(p) for p in seqs], 6, seed=2)
    for t in tables:
        engine.free(t)
    assert engine.kv_stats().num_sequences == 0
    assert model.config._attn_implementation == "eager"


def test_fork_copy_on_write_matches_hf(arch_model):
    arch, model = arch_model
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**22)
    prompt = prompts(3, [11])[0]  # a partial last block, shared after the fork
    parent = engine.add(prompt)
    ref = reference_logits(model, prompt)[-1]
    assert_close(engine.prefill([parent])[0], ref, f"{arch} prefill")
    child = engine.fork(parent)
    grandchild = engine.fork(child)
    stats = engine.kv_stats()
    assert stats.num_sequences == 3
    assert stats.blocks_in_use == 2 and stats.shared_blocks == 2
    assert stats.logical_tokens == 33 and stats.physical_tokens == 11
    assert stats.sharing_ratio == pytest.approx(3.0)
    # different tokens per branch: the shared partial block is copied before being written
    tables = [parent, child, grandchild]
    seqs = [list(prompt) for _ in tables]
    check_steps(engine, model, tables, seqs, 7, seed=4)  # 11 + 7 = 18 tokens: into a third block
    stats = engine.kv_stats()
    assert stats.shared_blocks == 1  # only the first (full) block is still shared
    assert stats.blocks_in_use == 1 + 3 * 2
    assert stats.logical_tokens == 3 * 18 and stats.physical_tokens == 8 + 3 * 10
    # a fork taken at a block boundary shares only full blocks: no copy, both get a new block
    a = engine.fork(parent)
    engine.free(child)
    engine.free(grandchild)
    check_steps(engine, model, [parent], [seqs[0]], 6, seed=5)  # parent: 24 tokens, 3 full blocks
    b = engine.fork(parent)
    check_steps(engine, model, [parent, b], [list(seqs[0]), list(seqs[0])], 2, seed=6)
    check_steps(engine, model, [a], [list(seqs[0][:18])], 1, seed=7)
    for t in (parent, a, b):
        engine.free(t)
    assert engine.kv_stats().num_sequences == 0


def test_decode_forked_matches_hf(arch_model):
    """Beam search launched ahead: new tables made on the device from the last step's rows (a
    parent's full blocks, then a reserved block receiving a copy of its partial block, or empty at
    a block boundary) give the model's own logits; the host's mirror (`fork_with_tail`) then holds
    the same tables, and an ordinary step after it matches HF too."""
    from sharedecode.kernels.beam_select import fork_beam_rows_torch

    arch, model = arch_model
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**22)
    for length in (11, 15):  # the forked step's token lands mid-block, then at a block boundary
        root = engine.add(prompts(length, [length])[0])
        engine.prefill([root])
        tables = [root, engine.fork(root)]
        seqs = [list(root.token_ids) for _ in tables]
        check_steps(engine, model, tables, seqs, 1, seed=length)  # the rows to fork from
        parents, tokens = [1, 0, 1], [5, 6, 7]  # parent 1 twice: two copies of its partial block
        positions = [len(seqs[p]) for p in parents]
        tails = engine.allocator.reserve(len(parents))
        columns = [p // BLOCK for p in positions]
        # fork_beam_rows_torch's input layout: one request of 3 beams whose chosen candidates
        # (positions 0-2 of its top-K) have flat indices parent * vocab + token
        keep = 3
        flat = torch.tensor([[0.0] * keep + [p * VOCAB + t for p, t in zip(parents, tokens)]
                             + [0.0, 1.0, 2.0] + [0.0] * 3], dtype=torch.float64)
        ints = lambda values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
        previous = engine.last_block_tables
        width = max(previous.shape[1], max(columns) + 1)
        # (the previous step had 2 rows of one "request" of 2 beams: pad it to 3 rows per request)
        padded = torch.cat([previous, previous[:1]])
        rows, copy_src, input_ids, _ = fork_beam_rows_torch(
            flat, ints([0]), padded, ints(columns), ints(tails), ints([int(p % BLOCK != 0) for p in positions]),
            VOCAB, 3, width)
        logits = engine.decode_forked(rows, copy_src, positions, tails, input_ids)
        children = [engine.allocator.fork_with_tail(tables[p], tail, t) for p, tail, t in zip(parents, tails, tokens)]
        for table in tables:
            engine.free(table)
        engine.allocator.mark_all_computed(children)
        engine.allocator.check()
        assert [c.block_ids + [0] * (width - len(c.block_ids)) for c in children] == rows.tolist()
        child_seqs = [seqs[p] + [t] for p, t in zip(parents, tokens)]
        for i, seq in enumerate(child_seqs):
            assert children[i].token_ids == seq
            assert_close(logits[i], reference_logits(model, seq)[-1], f"{arch} forked decode, seq {i}")
        check_steps(engine, model, children, child_seqs, 1, seed=length + 1)
        for child in children:
            engine.free(child)
        assert engine.kv_stats().blocks_in_use == 0


def test_decode_forked_validates_shapes_and_needs_a_decode_step_first():
    model = make_model("llama")
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**22)
    with pytest.raises(RuntimeError, match="no decode step"):
        engine.last_block_tables
    rows = torch.zeros(2, 3, dtype=torch.int32)
    ids = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="decode_forked got"):
        engine.decode_forked(rows, ids, [8, 8], [1], ids)
    with pytest.raises(ValueError, match="decode_forked got"):
        engine.decode_forked(rows, ids[:1], [8, 8], [1, 2], ids)


def test_shared_prefix_reuses_cached_blocks(arch_model):
    arch, model = arch_model
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**22)
    prefix = prompts(7, [19])[0]
    first = prefix + [5, 6, 7]
    second = prefix + [9, 10]
    t1 = engine.add(first)
    assert_close(engine.prefill([t1])[0], reference_logits(model, first)[-1], f"{arch} first")
    t2 = engine.add(second)
    assert t2.num_cached_tokens == 16  # the two full blocks of the shared prefix
    assert t2.block_ids[:2] == t1.block_ids[:2]
    assert engine.kv_stats().shared_blocks == 2
    assert_close(engine.prefill([t2])[0], reference_logits(model, second)[-1], f"{arch} second")
    check_steps(engine, model, [t1, t2], [list(first), list(second)], 3, seed=8)
    # freed cached blocks stay evictable and are reused by a third prompt, even in one call with
    # a prompt that computes them itself (same prefill call, computed in order)
    engine.free(t1)
    engine.free(t2)
    stats = engine.kv_stats()
    assert stats.num_sequences == 0 and stats.blocks_in_use == 0
    assert stats.evictable_blocks >= 2
    third = prefix[:16] + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # 26: 3 full blocks + 2
    fourth = third[:24] + [21, 22, 23]
    t3 = engine.add(third)
    t4 = engine.add(fourth)
    assert t3.num_cached_tokens == 16
    assert t4.num_cached_tokens == 24  # its third block is t3's, not computed yet...
    before = engine.prefilled_tokens
    logits = engine.prefill([t3, t4])  # ...but t3 is computed first, in the same forward
    assert engine.prefilled_tokens - before == (26 - 16) + (27 - 24)  # t4 only its own 3 tokens
    assert_close(logits[0], reference_logits(model, third)[-1], f"{arch} third")
    assert_close(logits[1], reference_logits(model, fourth)[-1], f"{arch} fourth")
    engine.free_all()
    # after a reset a prompt seen before is computed again, to the same logits
    assert engine.reset_prefix_cache() >= 3
    assert engine.kv_stats().evictable_blocks == 0
    t5 = engine.add(third)
    assert t5.num_cached_tokens == 0
    assert_close(engine.prefill([t5])[0], reference_logits(model, third)[-1], f"{arch} after reset")
    engine.free_all()


@pytest.mark.parametrize("max_prefill_tokens", [4096, 20])
def test_a_system_prompt_shared_in_one_prefill_call_is_computed_once(max_prefill_tokens):
    """Requests sharing a system prompt, admitted together (nothing cached yet): the first computes
    the shared blocks, the others only their own tokens, in the same forward or in later chunks,
    and every request's logits are its full prompt's."""
    model = make_model("llama")
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**22, max_prefill_tokens=max_prefill_tokens)
    system = prompts(5, [2 * BLOCK + 3])[0]
    requests = [system + own for own in prompts(6, [5, 9, 1, 12])]
    tables = [engine.add(r) for r in requests]
    assert [t.num_cached_tokens for t in tables] == [0] + [2 * BLOCK] * 3
    logits = engine.prefill(tables)
    assert engine.prefilled_tokens == sum(map(len, requests)) - 3 * 2 * BLOCK
    for request, row in zip(requests, logits):
        assert_close(row, reference_logits(model, request)[-1], f"{len(request)} tokens")
    check_steps(engine, model, tables, [list(r) for r in requests], 2, seed=4)
    engine.free_all()
    assert engine.kv_stats().blocks_in_use == 0


def _cached_pair(engine):
    """Two prompts where the second reuses 3 blocks, the third of them hashed (not yet computed) by
    the first."""
    third = prompts(11, [26])[0]
    fourth = third[:24] + [21, 22, 23]
    t3, t4 = engine.add(third), engine.add(fourth)
    assert (t3.num_cached_tokens, t4.num_cached_tokens) == (0, 24)
    return (third, t3), (fourth, t4)


def test_chunked_prefill_of_prompts_sharing_blocks():
    model = make_model("llama")
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**22, max_prefill_tokens=4)
    (third, t3), (fourth, t4) = _cached_pair(engine)
    logits = engine.prefill([t3, t4])  # t3's blocks are written by earlier chunks than t4's
    assert_close(logits[0], reference_logits(model, third)[-1], "owner")
    assert_close(logits[1], reference_logits(model, fourth)[-1], "reuser")


def test_chunked_prefill_of_prompts_sharing_blocks_in_reverse_order():
    model = make_model("llama")
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**22, max_prefill_tokens=4)
    (third, t3), (fourth, t4) = _cached_pair(engine)
    logits = engine.prefill([t4, t3])
    assert_close(logits[1], reference_logits(model, third)[-1], "owner")
    assert_close(logits[0], reference_logits(model, fourth)[-1], "reuser")


# ------------------------------------------------------------------------------ kv_stats
def test_kv_stats_fields():
    model = make_model("llama")
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**20)
    bpt = engine.layout.bytes_per_token
    assert bpt == 2 * 2 * 2 * 8 * 4  # K+V x layers x kv heads x head_dim x fp32
    num_blocks = 2**20 // (bpt * BLOCK)
    stats = engine.kv_stats()
    assert (stats.num_blocks, stats.block_size, stats.blocks_in_use, stats.free_blocks) == \
        (num_blocks, BLOCK, 0, num_blocks)
    assert stats.fragmentation == 0.0 and stats.sharing_ratio == 0.0
    t = engine.add(prompts(9, [20])[0])
    engine.prefill([t])
    c = engine.fork(t)
    stats = engine.kv_stats()
    assert stats.blocks_in_use == 3 and stats.shared_blocks == 3
    assert stats.free_blocks == num_blocks - 3 and engine.num_free_blocks == num_blocks - 3
    assert stats.num_sequences == 2
    assert stats.logical_tokens == 40 and stats.physical_tokens == 20
    assert stats.bytes_per_token == bpt
    assert stats.bytes_used == 3 * BLOCK * bpt
    assert stats.contiguous_bytes == 40 * bpt
    assert stats.fragmentation == pytest.approx(1 - 20 / 24)
    assert stats.sharing_ratio == pytest.approx(2.0)
    engine.decode([t, c], [4, 5])  # copy-on-write of the partial last block
    stats = engine.kv_stats()
    assert stats.blocks_in_use == 4 and stats.shared_blocks == 2
    assert stats.logical_tokens == 42 and stats.physical_tokens == 16 + 5 + 5
    engine.free(c)
    engine.free(t)
    stats = engine.kv_stats()
    assert stats.num_sequences == 0 and stats.blocks_in_use == 0
    assert stats.evictable_blocks == 2  # the two full prompt blocks, kept for reuse
    assert stats.free_blocks + stats.evictable_blocks == num_blocks


def test_decode_that_does_not_fit_changes_nothing():
    from sharedecode.block_allocator import KVCacheFull

    model = make_model("llama")
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=3 * BLOCK * 2 * 2 * 2 * 8 * 4)
    assert engine.kv_stats().num_blocks == 3
    prompt = prompts(12, [20])[0]
    parent = engine.add(prompt)
    engine.prefill([parent])
    child = engine.fork(parent)
    with pytest.raises(KVCacheFull):
        engine.decode([parent, child], [4, 5])  # the shared partial block needs a copy: no room
    assert parent.token_ids == prompt and child.token_ids == prompt
    engine.allocator.check()
    engine.free(child)
    seq = list(prompt)
    check_steps(engine, model, [parent], [seq], 4, seed=13)  # 24 tokens: fills the third block
    with pytest.raises(ValueError, match="tables"):
        engine.decode([parent], [1, 2])


# ------------------------------------------------------------------------------ model handling
def _unsupported_models():
    out = []
    for name, cfg_cls, model_cls, kwargs in [
        ("bloom", "BloomConfig", "BloomForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
        ("gpt_neo", "GPTNeoConfig", "GPTNeoForCausalLM",
         dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
              attention_types=[[["global", "local"], 1]], max_position_embeddings=64)),
        ("falcon", "FalconConfig", "FalconForCausalLM",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    ]:
        model_cls = getattr(transformers, model_cls)
        if not model_cls._supports_attention_backend:
            out.append(pytest.param(getattr(transformers, cfg_cls), model_cls, kwargs, id=name))
    return out


@pytest.mark.parametrize("config_cls,model_cls,kwargs", _unsupported_models())
def test_model_without_attention_interface_is_refused(config_cls, model_cls, kwargs):
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    with pytest.raises(ValueError, match=model_cls.__name__):
        Engine(model, block_size=BLOCK, kv_cache_bytes=2**20)


def test_not_a_model_is_refused():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        Engine(torch.nn.Linear(2, 2), block_size=BLOCK, kv_cache_bytes=2**20)


def test_user_model_keeps_its_attention(arch_model):
    arch, model = arch_model
    for implementation in ("eager", "sdpa") if model._supports_sdpa else ("eager",):
        model.set_attn_implementation(implementation)
        engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**20)
        prompt = prompts(10, [10])[0]
        t = engine.add(prompt)
        engine.prefill([t])
        engine.decode([t], [4])
        assert model.config._attn_implementation == implementation
        # the model's own forward and generate still work on the same object
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                 do_sample=False, pad_token_id=0)
        assert out.shape == (1, 13)
        assert model.config._attn_implementation == implementation
    model.set_attn_implementation("eager")


def test_attention_restored_when_the_forward_fails():
    model = make_model("llama")
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**20)
    t = engine.add([VOCAB + 5, 3, 4])  # out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        engine.prefill([t])
    assert model.config._attn_implementation == "eager"


def test_paged_attention_needs_the_engine():
    model = make_model("llama")
    model.set_attn_implementation("sharedecode_paged")
    with pytest.raises(RuntimeError, match="sharedecode.Engine"):
        model(input_ids=torch.tensor([[3, 4, 5]]))


# ------------------------------------------------------------------------------ loading by path
def test_engine_loads_a_local_directory_offline(tmp_path, monkeypatch):
    model = make_model("llama", seed=3)
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL_DIR / name, tmp_path / name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = Engine(tmp_path, block_size=BLOCK, kv_cache_bytes=2**20, device="cpu")
    assert type(engine.model).__name__ == "LlamaForCausalLM"
    assert engine.device.type == "cpu" and engine.dtype == torch.float32
    assert engine.tokenizer is not None
    ids = [i % VOCAB for i in engine.tokenizer("To be, or not to be")["input_ids"]]
    t = engine.add(ids)
    logits = engine.prefill([t])
    engine.model.set_attn_implementation("eager")
    assert_close(logits[0], reference_logits(engine.model, ids)[-1], "loaded model")
    # the same weights as saved
    assert_close(logits[0], reference_logits(model, ids)[-1], "saved model")
