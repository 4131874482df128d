"""One GEMM instead of three (q, k, v) or two (gate, up) in the captured decode step.

A decode step of a small model is launch- and latency-bound: per layer, the q/k/v and gate/up
projections read the same input through separate small GEMMs. Without rewriting the model, the
projections that share an input are swapped, for the duration of a capture only, for thin modules that
share one fused GEMM: the first of a group computes `x @ [Wq; Wk; Wv]^T` once, the others return
their slice of it. The original `nn.Linear` weights become views of the fused weight, so the model
keeps working unchanged and no weight is stored twice.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

# Projections that a transformers decoder layer applies to the same input, in call order.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedProjection:
    """The fused weight (and bias) of a group, and the last input/output: one GEMM per input."""

    def __init__(self, linears: list[nn.Linear]):
        self.weight = torch.cat([linear.weight.detach() for linear in linears])
        has_bias = linears[0].bias is not None
        self.bias = torch.cat([linear.bias.detach() for linear in linears]) if has_bias else None
        self.bounds = []
        start = 0
        for linear in linears:  # the originals become views: the same numbers, stored once
            end = start + linear.out_features
            linear.weight.data = self.weight[start:end]
            if has_bias:
                linear.bias.data = self.bias[start:end]
            self.bounds.append((start, end))
            start = end
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None


class FusedSlice(nn.Module):
    """Stands in for one projection of a group: its columns of the group's fused GEMM."""

    def __init__(self, fused: FusedProjection, index: int):
        super().__init__()
        self.fused = fused
        self.start, self.end = fused.bounds[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused
        if fused.input is not x:  # a different input: this group's GEMM has not run on it yet
            fused.input = x
            fused.output = nn.functional.linear(x, fused.weight, fused.bias)
        return fused.output[..., self.start:self.end]


def _fusable(linears: list) -> bool:
    if not all(type(linear) is nn.Linear for linear in linears):  # quantized or wrapped layers stay as they are
        return False
    first = linears[0]
    return all(linear.in_features == first.in_features and linear.weight.dtype == first.weight.dtype
               and linear.weight.device == first.weight.device and (linear.bias is None) == (first.bias is None)
               and not hasattr(linear, "_hf_hook") for linear in linears)


class ProjectionFuser:
    """Finds the fusable projection groups of `model` once; `active()` swaps them in for a block."""

    def __init__(self, model: nn.Module):
        self.groups: list[tuple[nn.Module, tuple[str, ...], list[nn.Linear], FusedProjection]] = []
        for module in model.modules():
            for names in GROUPS:
                linears = [getattr(module, name, None) for name in names]
                if _fusable(linears):
                    self.groups.append((module, names, linears, FusedProjection(linears)))

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @contextmanager
    def active(self) -> Iterator[None]:
        for module, names, _linears, fused in self.groups:
            for index, name in enumerate(names):
                setattr(module, name, FusedSlice(fused, index))
        try:
            yield
        finally:
            for module, names, linears, fused in self.groups:
                for name, linear in zip(names, linears):
                    setattr(module, name, linear)
                fused.input = fused.output = None  # hold no activation past the block
