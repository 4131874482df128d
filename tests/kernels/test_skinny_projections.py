"""The decode step's projections through the skinny GEMM (ProjectionFuser(skinny=True)): the same
logits as the model's own forward, the kernel used for steps of at most MAX_ROWS rows only, and
the SiLU MLPs' down projection computing silu(gate) * up itself (the gated kernel)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import sharedecode.kernels.skinny_matmul as skinny_matmul
from sharedecode.fused_projections import ProjectionFuser, SkinnyProjection

HIDDEN, INTERMEDIATE, LAYERS = 64, 96, 2


def tiny_llama(**kwargs) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, **kwargs)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def mlps(model) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers]


def run(model, ids, skinny: bool, monkeypatch) -> tuple[torch.Tensor, list, list]:
    """Logits under the fuser, with the weight shapes the skinny GEMM and the gated one ran with."""
    calls, gated = [], []
    original, original_gated = skinny_matmul.skinny_linear, skinny_matmul.skinny_silu_linear

    def counting(x, weight, bias=None, config=None):
        calls.append(tuple(weight.shape))
        return original(x, weight, bias, config)

    def counting_gated(gate_up, weight, bias=None, config=None):
        gated.append(tuple(weight.shape))
        return original_gated(gate_up, weight, bias, config)

    monkeypatch.setattr(skinny_matmul, "skinny_linear", counting)
    monkeypatch.setattr(skinny_matmul, "skinny_silu_linear", counting_gated)
    fuser = ProjectionFuser(model, skinny=skinny)
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad(), fuser.active():
        if skinny:
            assert sum(isinstance(m, SkinnyProjection) for m in model.modules()) == 2 * LAYERS  # o, down
        logits = model(ids).logits
    assert not any(isinstance(m, SkinnyProjection) for m in model.modules())  # restored
    assert not any("forward" in vars(m) for m in model.modules())  # no instance forward left
    return logits, calls, gated


@pytest.mark.parametrize("tokens", [1, 7, 16])
def test_skinny_projections_give_the_models_logits(model, tokens, monkeypatch):
    ids = torch.randint(0, 96, (1, tokens))
    with torch.no_grad():
        reference = model(ids).logits
    logits, calls, gated = run(model, ids, True, monkeypatch)
    # per layer: q/k/v fused, o, gate/up fused; down with silu(gate) * up in the gated kernel
    per_layer = [(HIDDEN + 2 * 32, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN)]
    assert sorted(calls) == sorted(per_layer * LAYERS)
    assert gated == [(HIDDEN, INTERMEDIATE)] * LAYERS
    err = ((logits - reference).norm() / reference.norm()).item()
    assert err < 1e-4, err


def test_the_gated_forward_is_swapped_in_for_the_block_only(model):
    fuser = ProjectionFuser(model, skinny=True)
    assert [m for m, _ in fuser.gated_mlps] == mlps(model)
    with fuser.active():
        for mlp, forward in fuser.gated_mlps:
            assert vars(mlp)["forward"] is forward and mlp.forward is forward
    for mlp in mlps(model):
        assert "forward" not in vars(mlp) and mlp.forward.__func__ is type(mlp).forward
    with pytest.raises(RuntimeError, match="inside"), fuser.active():  # restored on an error too
        raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in mlps(model))


def test_more_rows_than_the_kernel_takes_use_the_plain_gemm(model, monkeypatch):
    ids = torch.randint(0, 96, (2, 9))  # 18 rows
    with torch.no_grad():
        reference = model(ids).logits
    logits, calls, gated = run(model, ids, True, monkeypatch)
    assert calls == [] and gated == []
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_skinny_off_never_calls_the_kernel(model, monkeypatch):
    _, calls, gated = run(model, torch.randint(0, 96, (1, 4)), False, monkeypatch)
    assert calls == [] and gated == []
    assert all(type(m) is not SkinnyProjection for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)


def test_a_gelu_mlp_keeps_its_forward(monkeypatch):
    """The gated kernel computes SiLU only: an MLP with another activation is left as it is (its
    down projection still goes through the plain skinny GEMM)."""
    model = tiny_llama(hidden_act="gelu")
    assert ProjectionFuser(model, skinny=True).gated_mlps == []
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        reference = model(ids).logits
    logits, calls, gated = run(model, ids, True, monkeypatch)
    assert gated == [] and calls.count((HIDDEN, INTERMEDIATE)) == LAYERS  # down_proj, ungated
    assert len(calls) == 4 * LAYERS
    err = ((logits - reference).norm() / reference.norm()).item()
    assert err < 1e-4, err


def test_the_engine_option_is_validated_and_reaches_the_captured_steps(model):
    from sharedecode import Engine
    from sharedecode.cuda_graphs import DecodeGraphs

    with pytest.raises(TypeError, match="skinny_gemm"):
        Engine(model, backend="torch", kv_cache_bytes=2**20, skinny_gemm="yes")
    engine = Engine(model, backend="triton", block_size=8, kv_cache_bytes=2**20)
    assert DecodeGraphs(engine, max_batch=8, max_context=64).fuser.skinny is True  # the default
    assert DecodeGraphs(engine, max_batch=8, max_context=64, skinny_gemm=False).fuser.skinny is False
