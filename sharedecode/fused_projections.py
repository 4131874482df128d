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
ms through cuBLAS, and the same at batch 8 (bench/NOTES.md, item 19). It also swaps the `forward`
of gated SiLU MLPs (transformers' `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with SiLU: Llama,
Mistral, Qwen2/3 and their copies) so that the down projection's GEMM computes silu(gate) * up from
the fused gate|up output while loading it: the elementwise kernel between the two GEMMs, a launch
and a gap per layer, is gone (measured only within the whole decode step on the H100:
bench/NOTES.md, item 36).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers import activations

from sharedecode.kernels.paged_attention import _interpreting
from sharedecode.kernels.skinny_matmul import MAX_ROWS  # (also registers the ops)

# Projections that a transformers decoder layer applies to the same input, in call order.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Projections applied alone (each to its own input), routed through the skinny GEMM only.
SINGLES = ("o_proj", "down_proj")
# SiLU modules: transformers' ACT2FN["silu"] (SiLUActivation, F.silu) and ["swish"] (nn.SiLU). Exact
# types: a subclass may compute something else.
SILU_TYPES = tuple(t for t in (nn.SiLU, getattr(activations, "SiLUActivation", None)) if t is not None)
# The MLP forwards whose `act_fn(gate) * up` the gated skinny GEMM may compute (as ast.dump-ed code)
_GATED_MLP_FORWARDS = {ast.dump(ast.parse(f"def forward(self, x):\n    {body}").body[0]) for body in (
    "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n    return down_proj",
    "return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))")}


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

    def __call__(self, x: torch.Tensor, skinny: bool) -> torch.Tensor:
        """All the group's columns for `x`, computed once per input."""
        if self.input is not x:  # a different input: this group's GEMM has not run on it yet
            self.input = x
            self.output = project(x, self.weight, self.bias, skinny)
        return self.output


class FusedSlice(nn.Module):
    """Stands in for one projection of a group: its columns of the group's fused GEMM."""

    def __init__(self, fused: FusedProjection, index: int, skinny: bool = False):
        super().__init__()
        self.fused = fused
        self.skinny = skinny
        self.start, self.end = fused.bounds[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x, self.skinny)[..., self.start:self.end]


class SkinnyProjection(nn.Module):
    """Stands in for a projection applied alone: the same weight through `project`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.linear.weight, self.linear.bias, True)


def gated_mlp_forward(mlp: nn.Module, fused: FusedProjection, down: nn.Linear,
                      x: torch.Tensor) -> torch.Tensor:
    """A gated SiLU MLP's forward (bound to `mlp` as its instance `forward`): for a CUDA step of at
    most MAX_ROWS rows the fused gate|up GEMM, then the down projection taking silu(gate) * up from
    its output; else the class's forward (through the swapped-in projections)."""
    rows = x.numel() // x.shape[-1]
    if rows <= MAX_ROWS and (x.is_cuda or _interpreting()):
        gate_up = fused(x, True)
        y = torch.ops.sharedecode.skinny_silu_linear(gate_up.reshape(rows, -1), down.weight, down.bias)
        return y.view(*x.shape[:-1], down.out_features)
    return type(mlp).forward(mlp, x)


@functools.lru_cache(maxsize=None)
def _standard_gated_forward(cls: type) -> bool:
    """Whether `cls.forward` is, as written, `down_proj(act_fn(gate_proj(x)) * up_proj(x))`."""
    forward = cls.forward
    if hasattr(forward, "__wrapped__"):  # a decorator may change what it computes
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):  # no source: not provably standard
        return False
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        tree.body = body[1:]  # the docstring
    return ast.dump(tree) in _GATED_MLP_FORWARDS


def _gated_mlp(module: nn.Module, names: tuple[str, ...],
               linears: list[nn.Linear]) -> nn.Linear | None:
    """`module`'s down_proj when `module` is a gated SiLU MLP whose gate/up group is `linears`."""
    down = getattr(module, "down_proj", None)
    gate = linears[0]
    if (names != ("gate_proj", "up_proj") or type(getattr(module, "act_fn", None)) not in SILU_TYPES
            or not _standard_gated_forward(type(module))
            or not _fusable([down]) or not down.weight.is_contiguous()
            or down.in_features != gate.out_features or gate.out_features != linears[1].out_features
            or down.weight.dtype != gate.weight.dtype or down.weight.device != gate.weight.device):
        return None
    return down


def _fusable(linears: list) -> bool:
    if not all(type(linear) is nn.Linear for linear in linears):  # quantized or wrapped layers stay as they are
        return False
    first = linears[0]
    return all(linear.in_features == first.in_features and linear.weight.dtype == first.weight.dtype
               and linear.weight.device == first.weight.device and (linear.bias is None) == (first.bias is None)
               and not hasattr(linear, "_hf_hook") for linear in linears)


class ProjectionFuser:
    """Finds the fusable projection groups of `model` once; `active()` swaps them in for a block
    (and, with `skinny`, the projections applied alone for skinny-GEMM ones and the gated MLPs'
    forward for `gated_mlp_forward`)."""

    def __init__(self, model: nn.Module, skinny: bool = False):
        self.skinny = skinny
        self.groups: list[tuple[nn.Module, tuple[str, ...], list[nn.Linear], FusedProjection]] = []
        self.singles: list[tuple[nn.Module, str, nn.Linear]] = []
        # (MLP, its gated forward): made once, as torch.compile guards on the forward's identity
        self.gated_mlps: list[tuple[nn.Module, functools.partial]] = []
        for module in model.modules():
            for names in GROUPS:
                linears = [getattr(module, name, None) for name in names]
                if _fusable(linears):
                    fused = FusedProjection(linears)
                    self.groups.append((module, names, linears, fused))
                    down = _gated_mlp(module, names, linears)
                    if down is not None:
                        forward = functools.partial(gated_mlp_forward, module, fused, down)
                        self.gated_mlps.append((module, forward))
            for name in SINGLES:
                linear = getattr(module, name, None)
                if _fusable([linear]) and linear.weight.is_contiguous():
                    self.singles.append((module, name, linear))
        self._stand_ins: dict[bool, list[tuple[nn.Module, str, nn.Module, nn.Linear]]] = {}

    def stand_ins(self) -> list[tuple[nn.Module, str, nn.Module, nn.Linear]]:
        """(module, attribute, stand-in, original) for the current `skinny`, made once per value:
        the eager forwards swap them in every time (building modules costs host time) and
        torch.compile guards on their identity."""
        if self.skinny not in self._stand_ins:
            swaps = [(module, name, FusedSlice(fused, index, self.skinny), linear)
                     for module, names, linears, fused in self.groups
                     for index, (name, linear) in enumerate(zip(names, linears))]
            if self.skinny:
                swaps += [(module, name, SkinnyProjection(linear), linear) for module, name, linear in self.singles]
            self._stand_ins[self.skinny] = swaps
        return self._stand_ins[self.skinny]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @contextmanager
    def active(self) -> Iterator[None]:
        swaps = self.stand_ins()
        for module, name, stand_in, _original in swaps:  # (registered submodules: no __setattr__ needed)
            module._modules[name] = stand_in
        # (not over a forward someone else set on the instance: that one is what the model runs)
        gated = [(m, f) for m, f in self.gated_mlps if "forward" not in vars(m)] if self.skinny else []
        for module, forward in gated:  # an instance attribute: shadows the class's forward
            module.forward = forward
        try:
            yield
        finally:
            for module, _forward in gated:  # back to none
                del module.forward
            for module, name, _stand_in, original in swaps:
                module._modules[name] = original
            self.forget_inputs()  # hold no activation past the block

    def forget_inputs(self) -> None:
        """Drop each group's last input and output. Before every compiled forward too: torch.compile
        guards on them (None, or a tensor of the last forward's shape), so a forward that found the
        previous one's tensors would compile the model again."""
        for _module, _names, _linears, fused in self.groups:
            fused.input = fused.output = None
