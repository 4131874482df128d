"""Fused q/k/v and gate/up projections (used inside captured decode steps) compute the same logits;
with `skinny`, the gated SiLU MLPs whose forward is swapped for the gated skinny GEMM's."""
from __future__ import annotations

import pytest
import torch
import transformers
from test_engine import ARCHS, make_model
from torch import nn

from sharedecode.fused_projections import FusedSlice, ProjectionFuser

# Phi-3 and GPT-2 already compute q/k/v (and gate/up) with one layer each: nothing to fuse.
ALREADY_FUSED = {"phi3", "gpt2"}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_projections_same_logits(arch):
    model = make_model(arch, seed=3)
    ids = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))
    linears_before = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    with torch.no_grad():
        reference = model(ids).logits
        fuser = ProjectionFuser(model)
        layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
        assert fuser.num_groups == (0 if arch in ALREADY_FUSED else 2 * layers)
        calls = []
        original_linear = nn.functional.linear

        def counting_linear(*args, **kwargs):
            calls.append(args[1])
            return original_linear(*args, **kwargs)

        nn.functional.linear = counting_linear
        try:
            with fuser.active():
                if fuser.num_groups:
                    assert any(isinstance(m, FusedSlice) for m in model.modules())
                fused = model(ids).logits
        finally:
            nn.functional.linear = original_linear
        unfused_again = model(ids).logits
    # one GEMM per group instead of one per projection
    if fuser.num_groups:
        fused_weights = [f.weight for _, _, _, f in fuser.groups]
        assert sum(any(w is f for f in fused_weights) for w in calls) == fuser.num_groups
        assert len(calls) == len(linears_before) - sum(len(names) - 1 for _, names, _, _ in fuser.groups)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfused_again, reference, rtol=0, atol=0)
    # the model is back to its own modules, and its weights are stored once (views of the fused ones)
    after = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert after.keys() == linears_before.keys() and all(after[k] is linears_before[k] for k in after)
    assert not any(isinstance(m, FusedSlice) for m in model.modules())
    for _, _, linears, fused_projection in fuser.groups:
        for linear in linears:
            assert linear.weight.untyped_storage().data_ptr() == fused_projection.weight.untyped_storage().data_ptr()


def test_fused_projection_recomputes_for_a_new_input():
    torch.manual_seed(0)
    layer = nn.Module()
    layer.q_proj, layer.k_proj, layer.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
    fuser = ProjectionFuser(layer)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    expected = layer.k_proj(b)
    with torch.no_grad(), fuser.active():
        layer.q_proj(a)
        got = layer.k_proj(b)  # not a's cached output
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- gated SiLU MLPs (skinny=True)
SILU_MLPS = {"llama", "mistral", "qwen2", "qwen3", "olmo2"}  # gemma: GELU; phi3, gpt2: no gate_proj


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gated_mlps_are_found_in_the_silu_architectures(arch):
    model = make_model(arch)
    fuser = ProjectionFuser(model, skinny=True)
    mlps = [m for m in model.modules() if type(m).__name__.endswith("MLP")]
    expected = mlps if arch in SILU_MLPS else []
    assert [mlp for mlp, _ in fuser.gated_mlps] == expected
    groups = {module: fused for module, names, _, fused in fuser.groups if names == ("gate_proj", "up_proj")}
    for mlp, forward in fuser.gated_mlps:
        assert forward.args == (mlp, groups[mlp], mlp.down_proj)


def llama_mlp(act_fn: nn.Module | None = None) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(transformers.LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2))
    if act_fn is not None:
        mlp.act_fn = act_fn
    return mlp


def test_only_the_standard_silu_mlp_is_taken():
    from transformers.models.llama.modeling_llama import LlamaMLP

    class Scaled(LlamaMLP):  # a forward of its own
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class Swapped(LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    class Documented(LlamaMLP):  # the standard computation, with a docstring
        def forward(self, x):
            """silu(gate) * up, down."""
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class MySiLU(nn.SiLU):  # a subclass may compute anything
        pass

    def found(mlp: nn.Module) -> bool:
        return [m for m, _ in ProjectionFuser(mlp, skinny=True).gated_mlps] == [mlp]

    assert found(llama_mlp()) and found(llama_mlp(nn.SiLU()))    # ACT2FN "silu" and "swish"
    documented = llama_mlp()
    documented.__class__ = Documented
    assert found(documented)
    for cls in (Scaled, Swapped):
        mlp = llama_mlp()
        mlp.__class__ = cls
        assert not found(mlp), cls
    assert not found(llama_mlp(nn.GELU())) and not found(llama_mlp(MySiLU()))
    patched = llama_mlp()  # a forward set on the instance by someone else: left as it is
    fuser = ProjectionFuser(patched, skinny=True)
    patched.forward = own = lambda x: x
    with fuser.active():
        assert patched.forward is own
    assert patched.forward is own
    half = llama_mlp()
    half.down_proj.half()
    assert not found(half)
    wrapped = llama_mlp()
    wrapped.down_proj = nn.Sequential(wrapped.down_proj)
    assert not found(wrapped)


def test_the_gated_forward_falls_back_to_the_model_off_the_kernel_path(monkeypatch):
    """On CPU without the Triton interpreter the swapped forward runs the class's own (through the
    fused projections): the same logits, and the MLPs' own forward back after the block."""
    import sharedecode.fused_projections as fp

    monkeypatch.setattr(fp, "_interpreting", lambda: False)
    ran = []
    real = fp.gated_mlp_forward
    monkeypatch.setattr(fp, "gated_mlp_forward", lambda mlp, *args: ran.append(mlp) or real(mlp, *args))
    model = make_model("llama", seed=5)
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        fuser = ProjectionFuser(model, skinny=True)
        with fuser.active():
            logits = model(ids).logits
    assert ran == [mlp for mlp, _ in fuser.gated_mlps] and len(ran) == model.config.num_hidden_layers
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())
