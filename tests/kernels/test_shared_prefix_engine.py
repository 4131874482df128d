"""The shared-prefix cascade in the engine's decode step: group detection, eager, compiled and the
CUDA-graph path's static buffers (the capture itself is GPU-only: bench/check_decode_gpu.py).

Engines run the triton backend on CPU through the Triton interpreter; logits are checked against
the model's own forward (Hugging Face eager attention) over each whole sequence.
"""
import random

import pytest
import torch
import transformers
from torch._dynamo.backends.debugging import aot_eager

import sharedecode.kernels.shared_prefix as sp
from sharedecode import Engine
from sharedecode.cuda_graphs import DecodeGraphs, GraphKey, capacity_class, flat_rows, pack_groups

BLOCK = 8
VOCAB = 96


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=8, max_position_embeddings=256, initializer_range=0.2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


# ------------------------------------------------------------------------------ group detection
def naive_groups(rows, ctx, bs):
    """The definition, one block at a time: bucket by first block, longest run shared by all
    members, capped at the smallest member's full blocks."""
    buckets = {}
    for i, row in enumerate(rows):
        if min(ctx[i] // bs, len(row)) >= 1:
            buckets.setdefault(row[0], []).append(i)
    out = []
    for mem in buckets.values():
        if len(mem) < 2:
            continue
        full = min(min(ctx[i] // bs, len(rows[i])) for i in mem)
        k = 1
        while k < full and all(rows[i][k] == rows[mem[0]][k] for i in mem):
            k += 1
        out.append((tuple(mem), k))
    return out


def random_tables(rng: random.Random, bs: int):
    """Trees of forks: each root prompt has children that copy a random number of its leading
    blocks (partially shared), then own blocks; context lens end anywhere in the last block
    (sometimes exactly full); plus sequences sharing nothing."""
    next_id = iter(rng.sample(range(10_000), 5_000))
    rows, ctx = [], []
    for _ in range(rng.randint(0, 4)):
        root = [next(next_id) for _ in range(rng.randint(1, 12))]
        for _ in range(rng.randint(1, 6)):
            keep = rng.randint(1, len(root))
            row = root[:keep] + [next(next_id) for _ in range(rng.randint(0, 4))]
            rows.append(row)
            ctx.append((len(row) - 1) * bs + rng.randint(1, bs))
    for _ in range(rng.randint(0, 4)):
        row = [next(next_id) for _ in range(rng.randint(1, 5))]
        rows.append(row)
        ctx.append((len(row) - 1) * bs + rng.randint(1, bs))
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [rows[i] for i in order], [ctx[i] for i in order]


@pytest.mark.parametrize("seed", range(40))
def test_group_detection_matches_definition_and_tensor_version(seed):
    rng = random.Random(seed)
    rows, ctx = random_tables(rng, BLOCK)
    groups = sp.group_shared_prefixes(rows, ctx, BLOCK)
    assert groups == naive_groups(rows, ctx, BLOCK)
    if not rows:
        return
    width = max(map(len, rows))
    bt = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32)
    pg = sp.find_prefix_groups(bt, torch.tensor(ctx, dtype=torch.int32), BLOCK)
    assert pg.groups == groups
    plen = [0] * len(rows)
    for mem, nblk in groups:
        for i in mem:
            plen[i] = nblk * BLOCK
            assert nblk * BLOCK <= ctx[i]  # every shared key exists for every member
    assert pg.seq_prefix_len.tolist() == plen
    assert pg.max_suffix_len == max(c - p for c, p in zip(ctx, plen))


def test_group_detection_cases():
    # forked beams, the last block partial: the full blocks are shared, not the partial one
    assert sp.group_shared_prefixes([[1, 2, 3], [1, 2, 4], [1, 2, 5]], [20, 20, 19], 8) == [((0, 1, 2), 2)]
    # identical tables (just forked): capped at the smallest member's full blocks
    assert sp.group_shared_prefixes([[1, 2, 3], [1, 2, 3]], [24, 17], 8) == [((0, 1), 2)]
    # no full block yet, or nothing shared: no group
    assert sp.group_shared_prefixes([[1], [1]], [7, 7], 8) == []
    assert sp.group_shared_prefixes([[1, 2], [3, 4], [5]], [16, 16, 8], 8) == []
    # several groups, loners in between, a group sharing only its first block
    rows = [[1, 2, 3], [9, 8], [1, 2, 4], [5, 6], [5, 7], [4]]
    assert sp.group_shared_prefixes(rows, [24, 16, 24, 16, 16, 8], 8) == [((0, 2), 2), ((3, 4), 1)]


def test_decode_groups_memo_matches_a_fresh_grouping(model):
    # the engine reuses the last step's groups while the tables' block-id lists are the same
    # objects: through appends, copy on write of shared partial blocks, forks, fork_into and
    # frees, what it returns must equal grouping from scratch
    engine = Engine(model, backend="torch", block_size=BLOCK, kv_cache_bytes=2**20)
    engine.shared_prefix, engine.shared_prefix_min_saved_tokens = True, 0  # (groups only)
    rng, g = random.Random(0), torch.Generator().manual_seed(3)
    system = torch.randint(3, VOCAB, (16,), generator=g).tolist()
    roots = [engine.add(system + torch.randint(3, VOCAB, (n,), generator=g).tolist()) for n in (3, 9)]
    roots.append(engine.add(torch.randint(3, VOCAB, (21,), generator=g).tolist()))  # its own group
    engine.prefill(roots)
    tables = roots + [engine.fork(root) for root in roots for _ in range(2)]  # shared partial blocks
    reused, seen = 0, set()
    for _ in range(60):
        action = rng.random()
        if action < 0.15:  # a pruned beam becomes another's sibling (maybe in another group): a new list
            engine.allocator.fork_into(rng.choice(tables[3:]), rng.choice(tables))
        elif action < 0.25:  # a sequence finishes, a fork of another starts
            engine.free(tables.pop(rng.randrange(3, len(tables))))
            tables.append(engine.fork(rng.choice(tables)))
        engine.allocator.append_tokens(tables, [rng.randrange(3, VOCAB) for _ in tables])
        block_ids, ctx = [t.block_ids for t in tables], [t.num_tokens for t in tables]
        memo = engine._groups_memo
        got = engine._shared_prefix_groups(block_ids, ctx)
        reused += engine._groups_memo is memo
        assert sorted(got) == sorted(sp.group_shared_prefixes(block_ids, ctx, BLOCK))
        seen.add(tuple(sorted(got)))
    assert len(seen) > 3, seen  # the groups did change along the way
    assert 20 < reused < 60, reused  # ...and were reused between changes
    engine.free_all()
    assert engine.kv_stats().blocks_in_use == 0


def test_group_layout_and_graph_packing():
    groups = [((0, 2, 5), 2), ((1, 3), 4)]
    lay = sp.layout_groups(groups, 7, 8, members_per_chunk=2)
    assert lay.members == [0, 2, 5, 1, 3]
    assert lay.chunk_start == [0, 2, 3] and lay.chunk_count == [2, 1, 2]
    assert lay.chunk_prefix_len == [16, 16, 32]
    assert lay.seq_prefix_len == [16, 32, 16, 32, 0, 16, 0]
    assert capacity_class(lay) == (4, 2)
    packed = pack_groups(lay, 8, 4)
    assert packed["chunk_count"] == [2, 1, 2, 0]  # the padding chunk has no members
    assert packed["chunk_start"] == [0, 2, 3, 0] and packed["chunk_prefix_len"] == [16, 16, 32, 0]
    assert packed["seq_prefix_len"] == [16, 32, 16, 32, 0, 16, 0, 0]  # padding rows share nothing
    assert packed["members"] == [0, 2, 5, 1, 3]
    with pytest.raises(ValueError, match="do not fit"):
        pack_groups(lay, 8, 2)
    assert capacity_class(sp.layout_groups([(tuple(range(65)), 1)], 65, 8)) == (2, 64)
    assert flat_rows([[4, 5], [6], [7, 8, 9]], 3) == [4, 5, 0, 6, 0, 0, 7, 8, 9]


# ------------------------------------------------------------------------------ engine, eager
def reference_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].float()


def assert_matches_hf(model, logits, sequences, what):
    for i, seq in enumerate(sequences):
        ref = reference_logits(model, seq)
        err = (logits[i] - ref).abs().max().item() / ref.abs().max().item()
        assert err <= 1e-4, f"{what}, sequence {i}: relative error {err:.3g}"


def setup_scenario(engine, name):
    """Tables and their token lists for one workload shape."""
    g = torch.Generator().manual_seed(1)

    def prompt(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    if name == "beams":  # 4 beams forked from one prompt with a partial last block
        root = engine.add(prompt(21))
        engine.prefill([root])
        tables = [root] + [engine.fork(root) for _ in range(3)]
    elif name == "system_prompt":  # prompts sharing cached system-prompt blocks, and one that does not
        system = prompt(16)
        tables = [engine.add(system + prompt(n)) for n in (3, 9, 12)] + [engine.add(prompt(11))]
        engine.prefill(tables)
        assert [t.num_cached_tokens for t in tables] == [0, 16, 16, 0]
    elif name == "several_groups":  # 2 prompts x 3 beams, and a loner
        roots = [engine.add(prompt(n)) for n in (17, 26, 5)]
        engine.prefill(roots)
        tables = [t for r in roots[:2] for t in (r, engine.fork(r), engine.fork(r))] + [roots[2]]
    else:  # nothing shared
        tables = [engine.add(prompt(n)) for n in (9, 20, 4)]
        engine.prefill(tables)
    return tables, [list(t.token_ids) for t in tables]


SCENARIOS = {"beams": 1, "system_prompt": 1, "several_groups": 2, "none": 0}  # -> groups


def decode_and_check(engine, model, name, steps=3):
    tables, sequences = setup_scenario(engine, name)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):  # different tokens per beam: copy-on-write of the partial blocks
        tokens = torch.randint(3, VOCAB, (len(tables),), generator=g).tolist()
        groups = sp.group_shared_prefixes([t.block_ids + [-1] for t in tables],
                                          [t.num_tokens + 1 for t in tables], BLOCK)
        assert len(groups) == SCENARIOS[name]
        logits = engine.decode(tables, tokens)
        for seq, token in zip(sequences, tokens):
            seq.append(token)
        assert_matches_hf(model, logits, sequences, f"{name} step {step}")
    engine.free_all()
    assert engine.kv_stats().blocks_in_use == 0


@pytest.fixture
def cascade_calls(monkeypatch):
    calls = []
    original = sp.shared_prefix_decode

    def spy(*args, **kwargs):
        calls.append(kwargs["groups"])
        return original(*args, **kwargs)

    monkeypatch.setattr(sp, "shared_prefix_decode", spy)
    return calls


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_engine_decode_through_cascade_matches_hf(model, name, cascade_calls):
    engine = Engine(model, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20)
    engine.shared_prefix_min_saved_tokens = 0  # these groups are tiny
    assert engine.shared_prefix and engine.graphs is None
    decode_and_check(engine, model, name)
    layers = model.config.num_hidden_layers
    assert len(cascade_calls) == (3 * layers if SCENARIOS[name] else 0)
    assert all(len(g.groups) == SCENARIOS[name] for g in cascade_calls)


def test_sliding_window_layers_keep_the_plain_kernel(cascade_calls):
    # Qwen2 with layer 0 full and layer 1 sliding (window of one block): one step mixes both paths
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, initializer_range=0.2,
                                      use_sliding_window=True, sliding_window=BLOCK, max_window_layers=1)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(config).eval()
    engine = Engine(qwen, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20)
    engine.shared_prefix_min_saved_tokens = 0
    decode_and_check(engine, qwen, "beams", steps=2)
    assert len(cascade_calls) == 2  # one full-attention layer, two steps


def test_shared_prefix_off_and_torch_backend_keep_the_plain_path(model, cascade_calls):
    for kwargs in ({"backend": "triton", "shared_prefix": False}, {"backend": "torch"}):
        engine = Engine(model, block_size=BLOCK, kv_cache_bytes=2**20, **kwargs)
        assert not engine.shared_prefix
        decode_and_check(engine, model, "beams", steps=1)
    assert cascade_calls == []


@pytest.mark.parametrize("margin, used", [(0, True), (1, False)])
def test_cascade_only_when_the_step_skips_enough_reads(model, cascade_calls, margin, used):
    engine = Engine(model, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20)
    tables, _ = setup_scenario(engine, "several_groups")  # 2 prompts x 3 beams and a loner
    groups = sp.group_shared_prefixes([t.block_ids for t in tables], [t.num_tokens + 1 for t in tables],
                                      BLOCK)
    saved = sum((len(members) - 1) * shared * BLOCK for members, shared in groups)
    assert saved > 0 and engine.shared_prefix_min_saved_tokens > saved  # the default: plain here
    engine.shared_prefix_min_saved_tokens = saved + margin
    engine.decode(tables, [5] * len(tables))
    assert bool(cascade_calls) == used
    engine.free_all()


def test_shared_prefix_option_is_validated(model):
    with pytest.raises(TypeError, match="shared_prefix"):
        Engine(model, backend="triton", kv_cache_bytes=2**20, shared_prefix="yes")


# ------------------------------------------------------------------------------ the graph path
def graph_engine(model, monkeypatch, compiled=None, **graph_kwargs):
    """An engine whose decode steps take the CUDA-graph path (static buffers, padded groups,
    graph keys), with the step run eagerly or compiled instead of captured and replayed."""
    engine = Engine(model, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20)
    engine.shared_prefix_min_saved_tokens = 0
    # 2 own-key splits: the interpreter runs every program, and the default fills a GPU twice
    graphs = DecodeGraphs(engine, max_batch=16, max_context=128, num_splits=2, fuse_projections=False,
                          **graph_kwargs)
    graphs.compiled = compiled and torch.compile(graphs._model_step, backend=compiled)
    keys = []
    graphs.copies_taken = []  # the copy-on-write pairs each step handed to the graph

    def run_uncaptured(token_ids, *args, input_ids=None, copies=(), reuse_output=False):
        graphs.copies_taken.append(list(copies))
        keys.append(graphs.stage(token_ids, *args, input_ids=input_ids, copies=copies))
        with torch.inference_mode(), graphs.model_swaps():
            return graphs._forward(keys[-1])[: len(token_ids)].clone()

    monkeypatch.setattr(graphs, "run", run_uncaptured)
    engine.graphs = graphs
    return engine, keys


@pytest.mark.parametrize("name,key", [("beams", (4, 1, 4)), ("system_prompt", (4, 1, 4)),
                                      ("several_groups", (8, 2, 4)), ("none", (4, 0, 0))])
def test_graph_path_static_buffers_match_hf(model, monkeypatch, name, key):
    engine, keys = graph_engine(model, monkeypatch)
    decode_and_check(engine, model, name, steps=2)
    assert set(keys) == {GraphKey(*key)}
    # The forks' copy-on-write copies are made by the graph itself (padded to the bucket): the
    # beams' first step copies the 3 forks' shared partial block (the root keeps its own), and
    # the logits above match HF only if those copies happened.
    copies = engine.graphs.copies_taken
    if name == "beams":
        assert [len(c) for c in copies] == [3, 0]


def test_graph_copies_fall_back_to_a_launch_when_they_do_not_fit(model, monkeypatch):
    """A copy list the graph cannot take (a block both read and written) is copied before the
    replay, and the step still matches HF."""
    engine, _ = graph_engine(model, monkeypatch)
    graphs = engine.graphs
    assert graphs.takes_copies([(1, 2), (3, 4)], 2)
    assert not graphs.takes_copies([(1, 2), (2, 3)], 2)  # block 2 read and written
    assert not graphs.takes_copies([(1, 2), (3, 4), (5, 6)], 2)  # more pairs than the bucket's rows
    monkeypatch.setattr(graphs, "takes_copies", lambda copies, n: False)
    decode_and_check(engine, model, "beams", steps=2)
    assert all(not c for c in graphs.copies_taken)


@pytest.mark.parametrize("folded", [True, False])
def test_plain_decode_with_the_kv_write_in_the_attention_kernel_matches_hf(model, monkeypatch, folded):
    """WRITE_KV_IN_KERNEL (on by default): the plain decode step's attention kernel writes the
    new keys/values itself, on the graph path and eagerly; no separate write runs inside a decode
    step, and the logits still match HF (they could not if the new keys were never written).
    Off: the separate write kernel runs in every decode step."""
    import sharedecode.attention as attention
    from sharedecode.kernels import kv_cache_ops

    monkeypatch.setattr(attention, "WRITE_KV_IN_KERNEL", folded)
    decoding, writes_in_decode = [False], []
    write_kv = kv_cache_ops.write_kv
    monkeypatch.setattr(kv_cache_ops, "write_kv",
                        lambda *a: writes_in_decode.append(decoding[0]) or write_kv(*a))
    graph_path, _ = graph_engine(model, monkeypatch)
    eager = Engine(model, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20)
    for engine in (graph_path, eager):
        decode = engine.decode

        def flagged(*args, decode=decode, **kwargs):
            decoding[0] = True
            try:
                return decode(*args, **kwargs)
            finally:
                decoding[0] = False

        engine.decode = flagged
        decode_and_check(engine, model, "none", steps=2)
    if folded:
        assert writes_in_decode and not any(writes_in_decode)  # prefill writes separately, decode does not
    else:
        assert any(writes_in_decode)


def test_graph_path_over_the_group_graph_bound_takes_the_plain_graph(model, monkeypatch, cascade_calls):
    engine, keys = graph_engine(model, monkeypatch, max_group_graphs=0)
    decode_and_check(engine, model, "several_groups", steps=1)
    assert keys == [GraphKey(8, 0, 0)] and cascade_calls == []


def test_compiled_graph_step_calls_the_cascade_op(model, monkeypatch):
    torch._dynamo.reset()
    traced = []

    def recording_backend(graph_module, example_inputs):
        traced.append(graph_module.code)
        return aot_eager(graph_module, example_inputs)

    engine, keys = graph_engine(model, monkeypatch, compiled=recording_backend)
    decode_and_check(engine, model, "several_groups", steps=2)
    assert set(keys) == {GraphKey(8, 2, 4)}
    layers = model.config.num_hidden_layers
    assert len(traced) == 1  # one graph, no break: one opaque cascade op per layer
    assert traced[0].count("sharedecode.shared_prefix_step") == layers
    assert "sharedecode.paged_attention_step" not in traced[0]


def test_staged_block_tables_follow_every_change(model):
    engine = Engine(model, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20)
    graphs = DecodeGraphs(engine, max_batch=8, max_context=64, fuse_projections=False)
    rng = random.Random(0)
    tables = [[rng.randrange(100) for _ in range(rng.randint(1, 8))] for _ in range(5)]
    for step in range(12):  # appends, copy-on-write, reorders, fewer and more rows
        if step % 3 == 0:
            rng.shuffle(tables)
        tables = [t[:-1] + [rng.randrange(100)] if rng.random() < 0.3 else t for t in tables]
        tables = [t + [rng.randrange(100)] if rng.random() < 0.3 and len(t) < 8 else t for t in tables]
        live = tables[: rng.randint(1, 5)]
        n = len(live)
        graphs.stage(list(range(n)), [0] * n, [0] * n, live, [len(t) * BLOCK for t in live])
        for row, ids in enumerate(live):
            assert graphs.block_tables[row, : len(ids)].tolist() == ids


def test_graph_path_takes_look_ahead_tokens_from_the_device(model, monkeypatch):
    # Greedy with EOS off: every step after the first is launched ahead, its input ids copied
    # into the static buffer on the device; the tokens match the torch backend stepping alone.
    from sharedecode.strategies import Greedy

    engine, keys = graph_engine(model, monkeypatch)
    engine.look_ahead = True  # (the default on CUDA only)
    fed = []
    stage = engine.graphs.stage

    def recording_stage(*args, input_ids=None, copies=()):
        fed.append(input_ids is not None)
        return stage(*args, input_ids=input_ids, copies=copies)

    monkeypatch.setattr(engine.graphs, "stage", recording_stage)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 17)]
    ours = Greedy(engine, max_new_tokens=6, eos_token_id=[]).run(prompts)
    reference = Engine(model, backend="torch", block_size=BLOCK, kv_cache_bytes=2**20)
    theirs = Greedy(reference, max_new_tokens=6, eos_token_id=[]).run(prompts)
    assert [r.sequences[0].token_ids for r in ours] == [r.sequences[0].token_ids for r in theirs]
    assert sum(fed) == 4 and len(fed) == 5  # steps 2-6 are decodes; all but the first ahead
    assert engine.kv_stats().blocks_in_use == 0


def test_graph_path_takes_beams_forked_on_the_device(model, monkeypatch):
    """Beam search launched ahead on the graph path: block tables made on the device and written
    into the static table, the parents' partial blocks copied into the reserved tails by the
    graph's own copy, shared-prefix groups over whole requests. Same beams as stepping on the
    same engine kind, and every block back at the end."""
    from sharedecode.strategies import BeamSearch

    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, VOCAB, (13,), generator=g).tolist()
    prompts = [system + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (2, 9, 4)]

    def run(look_ahead):
        engine, keys = graph_engine(model, monkeypatch)
        engine.look_ahead = look_ahead
        staged = []
        stage = engine.graphs.stage

        def recording_stage(token_ids, positions, slots, tables, *args, **kwargs):
            staged.append(tables)
            key = stage(token_ids, positions, slots, tables, *args, **kwargs)
            if not isinstance(tables, list):  # the static table holds the device rows
                assert torch.equal(engine.graphs.block_tables[: len(token_ids), : tables.rows.shape[1]],
                                   tables.rows)
            return key

        monkeypatch.setattr(engine.graphs, "stage", recording_stage)
        results = BeamSearch(engine, num_beams=3, max_new_tokens=5, min_new_tokens=5,
                             num_return_sequences=3).run(prompts)
        assert engine.kv_stats().blocks_in_use == 0 and not engine.allocator.reserved
        return results, staged, keys

    ahead, staged, keys = run(True)
    stepped, _, _ = run(False)
    for a, b in zip(ahead, stepped):
        assert [s.token_ids for s in a.sequences] == [s.token_ids for s in b.sequences]
        assert [s.score for s in a.sequences] == pytest.approx([s.score for s in b.sequences], rel=1e-5)
    forked = [not isinstance(t, list) for t in staged]
    assert sum(forked) == 3 and not forked[0]  # decodes 1-4: all but the first launched ahead
    assert any(key.chunks for key, f in zip(keys, forked) if f)  # groups in the steps ahead


def test_beam_kernels_in_the_engine_give_the_torch_paths_beams(model, monkeypatch):
    """The CUDA path of beam search (`beam_candidates` for the top-K and the running choice,
    `fork_beam_rows` for the tables of each step launched ahead), run here through the
    interpreter, against the CPU path's torch ops: the same beams and scores."""
    from sharedecode.strategies import BeamSearch, beam_search

    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 12)]

    def run(kernels):
        monkeypatch.setattr(beam_search, "_on_kernels", lambda tensor: kernels)
        engine = Engine(model, backend="triton", block_size=BLOCK, kv_cache_bytes=2**20, look_ahead=True)
        forked = []
        original = engine.decode_forked
        engine.decode_forked = lambda *a, **kw: forked.append(1) or original(*a, **kw)
        results = BeamSearch(engine, num_beams=3, max_new_tokens=5, eos_token_id=[4, 9]).run(prompts)
        assert engine.kv_stats().blocks_in_use == 0 and not engine.allocator.reserved
        return [[(s.token_ids, s.score) for s in r.sequences] for r in results], len(forked)

    kernels, forked = run(True)
    torch_ops, _ = run(False)
    assert forked >= 2
    for a, b in zip(kernels, torch_ops):
        assert [s[0] for s in a] == [s[0] for s in b]
        assert [s[1] for s in a] == pytest.approx([s[1] for s in b], rel=1e-6)
