"""The model's rotary embedding, deferred to the attention kernels in the captured decode step.

Compiled, a decoder layer's `apply_rotary_pos_emb` is two elementwise kernels (queries, keys) run
just before the attention kernel that loads the same queries and keys anyway. In a decode step of
a small model every launch costs more than its work (bench/NOTES.md, item 35). So while a step is
captured (`RotaryDeferral.active()`), each modeling module's `apply_rotary_pos_emb` that computes
the rotate-half form (checked once, numerically, on random inputs) is swapped for one that returns
the queries and keys unrotated and leaves cos/sin behind; our attention function takes them
(`take_deferred`) and the kernels rotate as they load (kernels/rotary.py). No model code changes:
the module attribute is restored when the block ends, and a call the kernels cannot take (partial
rotary, other layouts) runs the original function.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from types import ModuleType
from typing import Callable, Iterator

import torch
from torch import nn

FUNCTION_NAME = "apply_rotary_pos_emb"


class _Pending:
    """The last deferred rotation: its (unrotated) query and key, and their cos/sin."""

    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


PENDING = _Pending()


def take_deferred(query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cos [T, D], sin [T, D]) when the rotation of exactly this query [1, Hq, T, D] and key was
    deferred (the attention must apply it), else None. Clears what it hands out."""
    if PENDING.query is not query or PENDING.key is not key:
        return None
    rope = (PENDING.cos[0], PENDING.sin[0])
    PENDING.query = PENDING.key = PENDING.cos = PENDING.sin = None
    return rope


def _deferring(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        takes = (len(args) + len(kwargs) <= 1 and set(kwargs) <= {"unsqueeze_dim"} and unsqueeze_dim == 1
                 and q.dim() == 4 and q.shape[0] == 1 and cos.dim() == 3 and cos.shape[0] == 1
                 and cos.shape[-1] == q.shape[-1] and sin.shape == cos.shape)
        if not takes:
            return original(q, k, cos, sin, *args, **kwargs)
        PENDING.query, PENDING.key, PENDING.cos, PENDING.sin = q, k, cos, sin
        return q, k

    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


def computes_rotate_half(function: Callable) -> bool:
    """Whether `function(q, k, cos, sin)` is the rotate-half rotation, on small random fp32 inputs
    laid out as transformers passes them (q [1, H, T, D], cos [1, T, D])."""
    from sharedecode.kernels.rotary import rotary_torch  # (kernels load lazily: see attention.py)

    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=generator), torch.randn(1, 2, 3, 8, generator=generator)
    angles = torch.rand(3, 4, generator=generator) * 6
    cos, sin = torch.cat([angles, angles], -1).cos()[None], torch.cat([angles, angles], -1).sin()[None]
    try:
        q_out, k_out = function(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - any other signature or behaviour: not deferred
        return False
    expected_q = rotary_torch(q[0].transpose(0, 1), cos[0], sin[0]).transpose(0, 1)[None]
    expected_k = rotary_torch(k[0].transpose(0, 1), cos[0], sin[0]).transpose(0, 1)[None]
    return (isinstance(q_out, torch.Tensor) and isinstance(k_out, torch.Tensor)
            and q_out.shape == q.shape and k_out.shape == k.shape
            and torch.allclose(q_out, expected_q, atol=1e-5) and torch.allclose(k_out, expected_k, atol=1e-5))


class RotaryDeferral:
    """Finds, once, the modeling modules of `model`'s attention layers whose rotary can be deferred;
    `active()` swaps their function for the block."""

    def __init__(self, model: nn.Module):
        self.modules: list[ModuleType] = []
        self._swaps: list[tuple[ModuleType, Callable, Callable]] = []  # (module, original, deferring)
        seen: set[str] = set()
        for layer in model.modules():
            name = type(layer).__module__
            if name in seen or not hasattr(layer, "layer_idx") or not hasattr(layer, "head_dim"):
                continue
            seen.add(name)
            module = sys.modules.get(name)
            function = getattr(module, FUNCTION_NAME, None)
            if callable(function) and computes_rotate_half(function):
                self.modules.append(module)
                # made once: the compiled step guards on the function it traced
                self._swaps.append((module, function, _deferring(function)))

    @contextmanager
    def active(self) -> Iterator[None]:
        for module, _original, deferring in self._swaps:
            setattr(module, FUNCTION_NAME, deferring)
        try:
            yield
        finally:
            for module, original, _deferring in self._swaps:
                setattr(module, FUNCTION_NAME, original)
            PENDING.query = PENDING.key = PENDING.cos = PENDING.sin = None
