"""The rotary embedding deferred to the attention kernels in the captured decode step
(sharedecode/deferred_rotary.py): which models defer it, and the graph path's logits against each
model's own Hugging Face forward with the kernels rotating (the plain kernel as it loads, the
cascade's KV write otherwise). Engines run the triton backend through the Triton interpreter."""
import sys
from pathlib import Path

import pytest
import torch
import transformers

import sharedecode.attention as attention
from sharedecode.deferred_rotary import FUNCTION_NAME, PENDING, RotaryDeferral, computes_rotate_half

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the architectures of test_engine.py
from test_engine import ARCHS, COMMON, make_model  # noqa: E402
from test_shared_prefix_engine import decode_and_check, graph_engine  # noqa: E402

ROTARY_ARCHS = [arch for arch in ARCHS if arch != "gpt2"]


@pytest.fixture
def taken(monkeypatch):
    """What each attention call took from the deferral: (cos, sin) or None."""
    calls = []
    original = attention.take_deferred

    def spy(query, key):
        calls.append(original(query, key))
        return calls[-1]

    monkeypatch.setattr(attention, "take_deferred", spy)
    return calls


@pytest.mark.parametrize("arch", list(ARCHS))
def test_models_with_rotate_half_rotary_defer_it(arch):
    model = make_model(arch)
    deferral = RotaryDeferral(model)
    module = sys.modules[type(model).__module__]
    assert deferral.modules == ([module] if arch in ROTARY_ARCHS else [])
    original = getattr(module, FUNCTION_NAME, None)
    with deferral.active():
        if arch in ROTARY_ARCHS:
            assert getattr(module, FUNCTION_NAME) is not original
    assert getattr(module, FUNCTION_NAME, None) is original  # restored


def test_other_rotations_are_not_deferred():
    def interleaved(q, k, cos, sin):  # GPT-J style pairs: a different function
        def rotate(x):
            pairs = torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
            return x * cos[:, None] + pairs * sin[:, None]
        return rotate(q), rotate(k)

    assert not computes_rotate_half(interleaved)
    assert not computes_rotate_half(lambda q, k: (q, k))
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    assert computes_rotate_half(apply_rotary_pos_emb)


@pytest.mark.parametrize("scenario", ["none", "several_groups"])
@pytest.mark.parametrize("arch", ROTARY_ARCHS)
def test_graph_path_with_deferred_rotary_matches_hf(arch, scenario, monkeypatch, taken):
    """"none": plain decode, the attention kernel rotates as it loads; "several_groups": the cascade
    (rope_write_kv rotates and writes; sliding-window layers take the plain kernel). Every layer of
    the prefill and of every decode step took a deferred rotation."""
    from sharedecode.kernels import rotary

    writes = []
    rope_write_kv = rotary.rope_write_kv
    monkeypatch.setattr(rotary, "rope_write_kv", lambda *a: writes.append(1) or rope_write_kv(*a))
    model = make_model(arch)
    engine, _ = graph_engine(model, monkeypatch)
    engine.swap_from_tokens = 1  # the prefill (one forward) with the step's swaps too
    assert engine.graphs.rotary.modules
    steps = 2
    decode_and_check(engine, model, scenario, steps=steps)
    layers = model.config.num_hidden_layers
    # The prefill uses rope_write_kv in every layer, the decode steps in the cascade's layers (in
    # these three archs, every layer has a window or a softcap, which the cascade does not take).
    cascade = scenario == "several_groups" and arch not in ("mistral", "phi3", "gemma2")
    assert (len(writes) > layers) == cascade and len(writes) >= layers
    assert sum(t is not None for t in taken) == (steps + 1) * layers


@pytest.mark.parametrize("swap_from,swapped", [(None, False), (34, False), (33, True), (0, True)])
def test_prefill_forwards_take_the_swaps_from_a_number_of_tokens(monkeypatch, taken, swap_from, swapped):
    """Engine.swap_from_tokens: a prefill forward of 33 tokens (scenario "none") runs with the
    captured step's swaps (its rotary deferred) from that many tokens on, never with None."""
    model = make_model("llama")
    engine, _ = graph_engine(model, monkeypatch)
    engine.swap_from_tokens = swap_from
    decode_and_check(engine, model, "none", steps=1)
    layers = model.config.num_hidden_layers
    assert sum(t is not None for t in taken) == layers * (2 if swapped else 1)
    assert PENDING.query is None and PENDING.cos is None  # nothing held past the step


def test_partial_rotary_runs_the_models_own_function(monkeypatch, taken):
    """Phi-3 with partial_rotary_factor 0.5: cos covers half of head_dim, which the kernels do not
    take; the model's own rotary runs and the logits still match."""
    config = transformers.Phi3Config(**COMMON, partial_rotary_factor=0.5)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    engine, _ = graph_engine(model, monkeypatch)
    assert engine.graphs.rotary.modules  # the function is rotate-half; these calls are not
    decode_and_check(engine, model, "none", steps=1)
    assert taken and all(t is None for t in taken)


def test_deferral_is_off_for_the_torch_backend_and_on_request():
    from sharedecode import Engine
    from sharedecode.cuda_graphs import DecodeGraphs

    model = make_model("llama")
    torch_engine = Engine(model, backend="torch", block_size=8, kv_cache_bytes=2**20)
    assert DecodeGraphs(torch_engine, max_batch=4, max_context=64).rotary is None
    triton_engine = Engine(model, backend="triton", block_size=8, kv_cache_bytes=2**20)
    assert DecodeGraphs(triton_engine, max_batch=4, max_context=64, defer_rotary=False).rotary is None
    assert DecodeGraphs(triton_engine, max_batch=4, max_context=64).rotary is not None
