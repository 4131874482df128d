"""The decode step's projections through the skinny GEMM (ProjectionFuser(skinny=True)): the same
logits as the model's own forward, the kernel used for steps of at most MAX_ROWS rows only."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import sharedecode.kernels.skinny_matmul as skinny_matmul
from sharedecode.fused_projections import ProjectionFuser, SkinnyProjection


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def run(model, ids, skinny: bool, monkeypatch) -> tuple[torch.Tensor, list]:
    calls = []
    original = skinny_matmul.skinny_linear

    def counting(x, weight, bias=None, config=None):
        calls.append(tuple(weight.shape))
        return original(x, weight, bias, config)

    monkeypatch.setattr(skinny_matmul, "skinny_linear", counting)
    fuser = ProjectionFuser(model, skinny=skinny)
    with torch.no_grad(), fuser.active():
        if skinny:
            assert sum(isinstance(m, SkinnyProjection) for m in model.modules()) == 2 * 2  # o, down x 2 layers
        logits = model(ids).logits
    assert not any(isinstance(m, SkinnyProjection) for m in model.modules())  # restored
    return logits, calls


@pytest.mark.parametrize("tokens", [1, 7, 16])
def test_skinny_projections_give_the_models_logits(model, tokens, monkeypatch):
    ids = torch.randint(0, 96, (1, tokens))
    with torch.no_grad():
        reference = model(ids).logits
    logits, calls = run(model, ids, True, monkeypatch)
    # per layer: q/k/v fused, o, gate/up fused, down
    assert sorted(set(calls)) == sorted({(64 + 2 * 32, 64), (64, 64), (2 * 96, 64), (64, 96)})
    assert len(calls) == 4 * 2
    err = ((logits - reference).norm() / reference.norm()).item()
    assert err < 1e-4, err


def test_more_rows_than_the_kernel_takes_use_the_plain_gemm(model, monkeypatch):
    ids = torch.randint(0, 96, (2, 9))  # 18 rows
    with torch.no_grad():
        reference = model(ids).logits
    logits, calls = run(model, ids, True, monkeypatch)
    assert calls == []
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_skinny_off_never_calls_the_kernel(model, monkeypatch):
    _, calls = run(model, torch.randint(0, 96, (1, 4)), False, monkeypatch)
    assert calls == []
    assert all(type(m) is not SkinnyProjection for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)


def test_the_engine_option_is_validated_and_reaches_the_captured_steps(model):
    from sharedecode import Engine
    from sharedecode.cuda_graphs import DecodeGraphs

    with pytest.raises(TypeError, match="skinny_gemm"):
        Engine(model, backend="torch", kv_cache_bytes=2**20, skinny_gemm="yes")
    engine = Engine(model, backend="triton", block_size=8, kv_cache_bytes=2**20)
    assert DecodeGraphs(engine, max_batch=8, max_context=64).fuser.skinny is True  # the default
    assert DecodeGraphs(engine, max_batch=8, max_context=64, skinny_gemm=False).fuser.skinny is False
