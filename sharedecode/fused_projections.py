"""One GEMM instead of three (q, k, v) or two (gate, up) in the captured decode step, and the
skinny GEMM for a step's few rows.

A decode step of a small model is launch- and latency-bound: per layer, the q/k/v and gate/up
projections read the same input through separate small GEMMs. Without rewriting the model, the
projections that share an input are swapped, for the duration of a capture only, for thin modules that
share one fused GEMM: the first of a group computes `x @ [Wq; Wk; Wv]^T` once, the others return
their slice of it. The original `nn.Linear` weights become views of the fused weight, so the model
keeps working unchanged and no weight is stored twice.

With `skinny=True` (the captured decode steps' default), every projection of a decoder layer
(fused or not: o_proj and down_proj too) runs through the Triton skinny GEMM when the step has at
most `MAX_ROWS` rows. On the H100 the M1 decode step at batch 1 took 1.31 ms with it against 1.50
ms through cuBLAS, and the same at batch 8 (bench/NOTES.md, item 19).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from sharedecode.kernels.paged_attention import _interpreting
from sharedecode.kernels.skinny_matmul import MAX_ROWS  # (also registers the op)

# Projections that a transformers decoder layer applies to the same input, in call order.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Projections applied alone (each to its own input), routed through the skinny GEMM only.
SINGLES = ("o_proj", "down_proj")


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, skinny: bool) -> torch.Tensor:
    """`x @ weight^T (+ bias)`: the Triton skinny GEMM for a CUDA step of at most MAX_ROWS rows
    when `skinny`, else `nn.functional.linear` (cuBLAS)."""
    rows = x.numel() // x.shape[-1]
    # (on the CPU only under the Triton interpreter: tests run the kernel there)
    if skinny and (x.is_cuda or _interpreting()) and rows <= MAX_ROWS:
        y = torch.ops.sharedecode.skinny_linear(x.reshape(rows, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return nn.functional.linear(x, weight, bias)


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

    def __init__(self, fused: FusedProjection, index: int, skinny: bool = False):
        super().__init__()
        self.fused = fused
        self.skinny = skinny
        self.start, self.end = fused.bounds[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused
        if fused.input is not x:  # a different input: this group's GEMM has not run on it yet
            fused.input = x
            fused.output = project(x, fused.weight, fused.bias, self.skinny)
        return fused.output[..., self.start:self.end]


class SkinnyProjection(nn.Module):
    """Stands in for a projection applied alone: the same weight through `project`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.linear.weight, self.linear.bias, True)


def _fusable(linears: list) -> bool:
    if not all(type(linear) is nn.Linear for linear in linears):  # quantized or wrapped layers stay as they are
        return False
    first = linears[0]
    return all(linear.in_features == first.in_features and linear.weight.dtype == first.weight.dtype
               and linear.weight.device == first.weight.device and (linear.bias is None) == (first.bias is None)
               and not hasattr(linear, "_hf_hook") for linear in linears)


class ProjectionFuser:
    """Finds the fusable projection groups of `model` once; `active()` swaps them in for a block
    (and, with `skinny`, the projections applied alone for skinny-GEMM ones)."""

    def __init__(self, model: nn.Module, skinny: bool = False):
        self.skinny = skinny
        self.groups: list[tuple[nn.Module, tuple[str, ...], list[nn.Linear], FusedProjection]] = []
        self.singles: list[tuple[nn.Module, str, nn.Linear]] = []
        for module in model.modules():
            for names in GROUPS:
                linears = [getattr(module, name, None) for name in names]
                if _fusable(linears):
                    self.groups.append((module, names, linears, FusedProjection(linears)))
            for name in SINGLES:
                linear = getattr(module, name, None)
                if _fusable([linear]) and linear.weight.is_contiguous():
                    self.singles.append((module, name, linear))

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @contextmanager
    def active(self) -> Iterator[None]:
        for module, names, _linears, fused in self.groups:
            for index, name in enumerate(names):
                setattr(module, name, FusedSlice(fused, index, self.skinny))
        for module, name, linear in self.singles if self.skinny else ():
            setattr(module, name, SkinnyProjection(linear))
        try:
            yield
        finally:
            for module, names, linears, fused in self.groups:
                for name, linear in zip(names, linears):
                    setattr(module, name, linear)
                fused.input = fused.output = None  # hold no activation past the block
            for module, name, linear in self.singles:
                setattr(module, name, linear)
