"""Small host values to the device without a host sync.

`to_device` makes a tensor that lives as long as any tensor does. `upload` is the hot-path version
for values that the next kernels read at once (a step's running scores, row masks, copy-on-write
block ids): it reuses one pinned host buffer and one device buffer as a ring instead of allocating
pinned and device memory per call (on the H100 machine, ~60 us per call against ~15 us), so its
result is only valid until the ring comes round again (at least `RING_BYTES` of later uploads).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

RING_BYTES = 1 << 20
_ALIGN = 64
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64,
                 torch.int32: np.int32, torch.bool: np.bool_}


def to_device(values, device: torch.device, dtype=None) -> torch.Tensor:
    """A host list or CPU tensor on `device` without synchronising the stream (pinned copy)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def flat_rows(rows: Sequence[list[int]], width: int) -> list[int]:
    """Rows (block ids) zero-padded to `width`, as one flat list (converted in one pass)."""
    flat: list[int] = []
    zeros = [0] * width
    for ids in rows:
        flat += ids
        flat += zeros[: width - len(ids)]
    return flat


class UploadRing:
    """A pinned host buffer and a device buffer of `nbytes`, used as a ring by `upload`.

    Each upload writes its values into the next span of the host buffer (one numpy conversion),
    copies that span to the same span of the device buffer without blocking, and returns the device
    span. Device side, a later copy into a span is queued behind every kernel already queued on the
    stream, so no queued kernel sees its input change. Host side, a span is written again only after
    the ring wraps, and wrapping first waits until the previous lap's copies are done (an event; in
    a decode loop already done, since every step ends by reading its results on the host).
    """

    def __init__(self, device: torch.device, nbytes: int = RING_BYTES):
        self.on_cuda = device.type == "cuda"  # (a CPU ring only serves the tests)
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.on_cuda)
        self.host_bytes = self.host.numpy()
        self.device = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.offset = 0
        self.laps = 0

    def upload(self, values, dtype: torch.dtype) -> torch.Tensor:
        array = np.asarray(values, dtype=_NUMPY_DTYPES[dtype]).reshape(-1)
        size = array.nbytes
        start = -(-self.offset // _ALIGN) * _ALIGN
        if start + size > self.host_bytes.size:
            if size > self.host_bytes.size:
                raise ValueError(f"an upload of {size} bytes does not fit a ring of {self.host_bytes.size}")
            if self.on_cuda:
                lap_done = torch.cuda.Event()
                lap_done.record()
                lap_done.synchronize()
            start = 0
            self.laps += 1
        self.offset = start + size
        self.host_bytes[start : start + size] = array.view(np.uint8)
        span = self.device[start : start + size]
        span.copy_(self.host[start : start + size], non_blocking=True)
        return span.view(dtype)


_rings: dict[torch.device, UploadRing] = {}


def upload(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A flat host list as a 1-D tensor on `device`, for kernels queued right after (see the module
    docstring for how long it stays valid); on the CPU, a plain new tensor."""
    if device.type != "cuda" or dtype not in _NUMPY_DTYPES or len(values) * 8 > RING_BYTES // 4:
        return to_device(values, device, dtype)
    ring = _rings.get(device)
    if ring is None:
        ring = _rings[device] = UploadRing(device)
    return ring.upload(values, dtype)
