"""The decode step under torch.compile: the paged attention custom op inside a compiled model.

On CUDA the engine compiles the step before capturing it as a graph; here the same step runs on CPU
through the Triton interpreter with the "aot_eager" compiler backend (tracing, fake tensors and
functionalisation as with inductor, without generating code), against the uncompiled step.
"""

import pytest
import torch
import transformers

from torch._dynamo.backends.debugging import aot_eager

from sharedecode import Engine
from sharedecode.cuda_graphs import DecodeGraphs


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, initializer_range=0.2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("num_splits,fuse,defer", [(None, True, True), (2, True, True), (None, False, True),
                                                    (None, True, False)])
def test_compiled_decode_step_matches_eager(num_splits, fuse, defer):
    """The eager step is the model as HF runs it (its own rotary); the compiled one runs with the
    engine's swaps: fused projections and, with `defer`, the rotary inside the attention kernel."""
    torch._dynamo.reset()
    engine = Engine(tiny_llama(), backend="triton", block_size=8, kv_cache_bytes=2**20)
    graphs = DecodeGraphs(engine, max_batch=8, max_context=64, num_splits=num_splits, fuse_projections=fuse,
                          defer_rotary=defer)
    traced = []

    def recording_backend(graph_module, example_inputs):
        traced.append(graph_module.code)
        return aot_eager(graph_module, example_inputs)

    graphs.compiled = torch.compile(graphs._model_step, backend=recording_backend)
    prompts = [[5, 6, 7, 8, 9, 10, 11], list(range(20, 39)), [3, 4]]
    tables = [engine.add(p) for p in prompts]
    engine.prefill(tables)
    tables.append(engine.fork(tables[1]))  # a beam sharing every block of its parent
    steps = [[40, 41, 42, 43], [50, 51, 52, 53]]
    try:
        for tokens in steps:
            for table, token in zip(tables, tokens):
                engine.allocator.append(table, [token])
            engine._apply_copies()
            n = len(tables)
            key = graphs.stage(tokens, [t.num_tokens - 1 for t in tables],
                               [engine.allocator.slot_mapping(t, t.num_tokens - 1, t.num_tokens)[0]
                                for t in tables],
                               [t.block_ids for t in tables], [t.num_tokens for t in tables])
            assert key == (n, 0, 0)
            inputs = graphs.staging.device
            with torch.inference_mode():
                from sharedecode.attention import paged_attention_enabled

                with paged_attention_enabled(engine.model):
                    eager = graphs._model_step(inputs["input_ids"][None, :n], inputs["positions"][None, :n],
                                               graphs._batch(key)).clone()
                with graphs.model_swaps():
                    compiled = graphs._forward(key)
            assert torch.isfinite(compiled).all()
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
            for table in tables:
                engine.allocator.mark_computed(table)
    finally:
        engine.free_all()
    assert engine.kv_stats().blocks_in_use == 0
    # One graph for the whole step (no graph break), with one opaque attention call per layer.
    assert len(traced) == 1
    assert traced[0].count("sharedecode.paged_attention_step") == engine.shape.num_layers
    # deferred: no rotate_half (its negation) left in the traced model, cos/sin go to the kernels
    assert ("neg" in traced[0]) == (not defer)
    # 7 projections per layer + the LM head; fused: q/k/v and gate/up are one GEMM each, and every
    # projection of these few rows is the skinny GEMM (an opaque op; the LM head stays a linear)
    per_layer = 4 if fuse else 7
    assert traced[0].count("linear(") == engine.shape.num_layers * per_layer + 1
    # (down_proj is the gated GEMM: it computes silu(gate) * up from the fused gate|up output)
    assert traced[0].count("sharedecode.skinny_linear") == (engine.shape.num_layers * 3 if fuse else 0)
    assert traced[0].count("sharedecode.skinny_silu_linear") == (engine.shape.num_layers if fuse else 0)


def test_capture_raises_dynamo_recompile_limit_and_restores_it():
    """Every graph key may compile the step once more; past dynamo's limit (8) it would silently
    run, and be captured, uncompiled."""
    from sharedecode.cuda_graphs import _more_recompiles

    config = torch._dynamo.config
    before = config.recompile_limit
    with _more_recompiles():
        assert config.recompile_limit >= 64
        assert config.fail_on_recompile_limit_hit  # past it: an error, so the fallback warns
    assert config.recompile_limit == before and not config.fail_on_recompile_limit_hit


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def fresh_engine_and_graphs(max_context: int = 128):
    """(model, engine, graphs, traced, recording_backend) on a fresh dynamo: the tiny model's
    engine, its DecodeGraphs, and a compiler backend (aot_eager) that keeps each graph's code in
    `traced`."""
    torch._dynamo.reset()
    model = tiny_llama()
    engine = Engine(model, backend="triton", block_size=8, kv_cache_bytes=2**20)
    graphs = DecodeGraphs(engine, max_batch=8, max_context=max_context)
    traced = []

    def recording_backend(graph_module, example_inputs):
        traced.append(graph_module.code)
        return aot_eager(graph_module, example_inputs)

    return model, engine, graphs, traced, recording_backend


def test_compiled_prefill_matches_the_model_and_serves_new_lengths_without_recompiling():
    """Prefill chunks run through the dynamic-shape compilation with the step's swaps (fused
    projections, deferred rotary): the last-token logits equal the model's own forward, and prompts
    of other lengths reuse the compiled graph."""
    model, engine, graphs, traced, recording_backend = fresh_engine_and_graphs()
    graphs.compiled_prefill = torch.compile(graphs._model_prefill, backend=recording_backend)
    engine.graphs = graphs  # prefill only: a decode step would capture a CUDA graph
    engine.swap_from_tokens = 1
    gen = torch.Generator().manual_seed(3)
    first, second, third = (torch.randint(3, 96, (n,), generator=gen).tolist() for n in (19, 33, 26))
    suffixed = first[:16] + [7, 8, 9, 10, 11]  # two cached blocks, then a suffix prefill

    def reference(prompt):
        with torch.inference_mode():
            return model(torch.tensor([prompt])).logits[0, -1]

    # (prompts, compilations in all after them): one prompt; another length; two prompts in one
    # chunk, one of them a suffix after cached blocks; two prompts of other lengths: one
    # compilation serves them all (the sequence count is unbacked, not specialised at 1)
    plan = [([first], 1), ([second], 1), ([third, suffixed], 1),
            ([list(range(50, 90)), list(range(60, 73))], 1)]
    try:
        for prompts, compilations in plan:
            tables = [engine.add(p) for p in prompts]
            logits = engine.prefill(tables)
            for prompt, row in zip(prompts, logits):
                assert _rel_err(row, reference(prompt)) < 1e-4
            assert len(traced) == compilations, [len(p) for p in prompts]
            if prompts[-1] is suffixed:
                assert tables[1].num_cached_tokens == 16
    finally:
        engine.graphs = None
        engine.free_all()
    assert engine.kv_stats().blocks_in_use == 0
    assert graphs.compiled_prefill is not None  # no fallback happened
    for code in traced:
        assert code.count("sharedecode.paged_attention_step") == engine.shape.num_layers
        assert "neg" not in code  # the rotary went to the kernels


def test_compiled_prefill_falls_back_to_the_model_when_compilation_fails():
    model, engine, graphs, _, _ = fresh_engine_and_graphs()

    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    graphs.compiled_prefill = torch.compile(graphs._model_prefill, backend=failing_backend)
    engine.graphs = graphs
    engine.swap_from_tokens = 1
    prompt = list(range(10, 31))
    try:
        with pytest.warns(RuntimeWarning, match="prefills run uncompiled"):
            logits = engine.prefill([engine.add(prompt)])
        assert graphs.compiled_prefill is None
        logits_again = engine.prefill([engine.add(list(range(40, 52)))])  # no second warning
    finally:
        engine.graphs = None
        engine.free_all()
    with torch.inference_mode():
        assert _rel_err(logits[0], model(torch.tensor([prompt])).logits[0, -1]) < 1e-4
        assert _rel_err(logits_again[0], model(torch.tensor([list(range(40, 52))])).logits[0, -1]) < 1e-4
    assert engine.kv_stats().blocks_in_use == 0


def test_only_prefills_of_swap_from_tokens_or_more_run_compiled():
    _, engine, graphs, _, _ = fresh_engine_and_graphs()
    calls = []

    def counting_backend(graph_module, example_inputs):
        compiled = aot_eager(graph_module, example_inputs)
        return lambda *args: calls.append(1) or compiled(*args)

    graphs.compiled_prefill = torch.compile(graphs._model_prefill, backend=counting_backend)
    engine.graphs = graphs
    engine.swap_from_tokens = 30
    try:
        for length, compiled in ((29, False), (30, True), (12, False), (41, True)):
            before = len(calls)
            engine.prefill([engine.add(list(range(3, 3 + length)))])
            assert (len(calls) > before) == compiled, length
            engine.free_all()
            engine.reset_prefix_cache()
        engine.swap_from_tokens = None
        engine.prefill([engine.add(list(range(3, 60)))])
        assert len(calls) == 2
    finally:
        engine.graphs = None
        engine.free_all()


def test_warm_up_forwards_compile_the_step_once():
    """`_warm_up` runs the step three times in one block of swaps: each forward must find the fused
    projections without the previous forward's tensors (torch.compile guards on them), or every
    graph capture compiles the step twice and the compilations pile up to dynamo's limit."""
    _, engine, graphs, traced, recording_backend = fresh_engine_and_graphs(max_context=64)
    graphs.compiled = torch.compile(graphs._model_step, backend=recording_backend)
    tables = [engine.add(list(range(5, 5 + n))) for n in (7, 12)]
    engine.prefill(tables)
    try:
        for table, token in zip(tables, (40, 41)):
            engine.allocator.append(table, [token])
        key = graphs.stage([40, 41], [t.num_tokens - 1 for t in tables],
                           [engine.allocator.slot_mapping(t, t.num_tokens - 1, t.num_tokens)[0] for t in tables],
                           [t.block_ids for t in tables], [t.num_tokens for t in tables])
        with torch.inference_mode(), graphs.model_swaps():
            graphs._warm_up(key)
        assert len(traced) == 1
        assert all(fused.input is None for *_, fused in graphs.fuser.groups)  # nothing held after
    finally:
        engine.free_all()


@pytest.mark.parametrize("offsets", [(0, 24), (24, 0), (1, 40)])
def test_compiled_prefill_does_not_recompile_where_the_upload_ring_wraps(monkeypatch, offsets):
    """The prefill's inputs are views into `upload`'s ring; torch.compile specialises a view's
    storage offset at 0 and 1, so the ring coming round to its start recompiled the model (H100,
    W-shared 256). The compiled prefill takes copies: any offsets, one compilation."""
    import sharedecode.engine as engine_module

    _, engine, graphs, traced, recording_backend = fresh_engine_and_graphs()
    graphs.compiled_prefill = torch.compile(graphs._model_prefill, backend=recording_backend)
    engine.graphs = graphs
    engine.swap_from_tokens = 1
    offset = [0]

    def upload_at(values, device, dtype):  # each upload a view at the chosen element offset
        values = torch.tensor(list(values), dtype=dtype)
        buffer = torch.zeros(offset[0] + len(values), dtype=dtype)
        buffer[offset[0]:] = values
        return buffer[offset[0]:]

    monkeypatch.setattr(engine_module, "upload", upload_at)
    try:
        for index, at in enumerate(offsets):
            offset[0] = at
            engine.prefill([engine.add(list(range(3 + index, 30 + index)))])
    finally:
        engine.graphs = None
        engine.free_all()
    assert len(traced) == 1


def test_prefill_compilations_are_bounded_then_it_runs_uncompiled(monkeypatch):
    """Past PREFILL_COMPILATIONS (here 1: a second class of chunk, at most 16 tokens, needs
    another) the prefill warns and runs uncompiled from then on, with the same logits."""
    import sharedecode.cuda_graphs as cuda_graphs

    monkeypatch.setattr(cuda_graphs, "PREFILL_COMPILATIONS", 1)
    model, engine, graphs, _, _ = fresh_engine_and_graphs()
    graphs.compiled_prefill = torch.compile(graphs._model_prefill, backend=aot_eager)
    engine.graphs = graphs
    engine.swap_from_tokens = 1
    long_prompt, short_prompt = list(range(3, 30)), list(range(40, 45))
    try:
        engine.prefill([engine.add(long_prompt)])
        assert graphs.compiled_prefill is not None
        with pytest.warns(RuntimeWarning, match="prefills run uncompiled"):
            logits = engine.prefill([engine.add(short_prompt)])
        assert graphs.compiled_prefill is None
    finally:
        engine.graphs = None
        engine.free_all()
    with torch.inference_mode():
        assert _rel_err(logits[0], model(torch.tensor([short_prompt])).logits[0, -1]) < 1e-4
