"""Fused q/k/v and gate/up projections (used inside captured decode steps) compute the same logits."""
from __future__ import annotations

import pytest
import torch
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
