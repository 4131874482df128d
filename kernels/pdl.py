"""Programmatic dependent launch (PDL, sm_90+) for the kernels of a decode step.

A kernel launched with PDL may start while the kernel before it in the stream finishes: its
programs load what does not depend on that kernel (weights, constants) and then wait
(`tl.extra.cuda.gdc_wait()`) before reading anything it wrote or writing anything at all. When a
program has done its main work it may let the next kernel launch (`gdc_launch_dependents()`): that
kernel waits for this one in the same way. A decode step of a small model is ~150 short kernels,
each paying a launch and a ramp-up; PDL overlaps those with the tail of the kernel before.
Measured slower on the GPU, so off by default (see ENABLED); the kernels keep the code path,
tested through the interpreter and on the GPU, for the next attempt.

    on = pdl.applies(device)            # the kernel's PDL constexpr
    kernel[grid](..., PDL=on, **pdl.launch_options(on))
"""
from __future__ import annotations

import functools
import os

import torch

# Off: on an H200 the captured M1 decode step replayed in 1.089 / 1.191 / 1.479 ms at batch 1 / 8 /
# 64 with it against 1.039 / 1.154 / 1.480 without (bench/NOTES.md, item 29).
ENABLED = False


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def applies(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: on switch, CUDA sm_90+, not the interpreter."""
    if not ENABLED or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return _capability(device) >= (9, 0)


def launch_options(on: bool) -> dict:
    """The launch keywords of a kernel whose PDL constexpr is `on`."""
    return {"launch_pdl": True} if on else {}
