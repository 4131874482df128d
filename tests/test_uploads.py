"""The upload ring: values arrive exactly, spans are aligned and reused only after a full lap."""

import pytest
import torch

from sharedecode.uploads import UploadRing, upload


@pytest.mark.parametrize("dtype, values", [
    (torch.float32, [0.1, -2.5, 1e-30, float("inf"), -0.0]),
    (torch.int64, [0, -1, 2**40, 7]),
    (torch.int32, [3, -4, 2**31 - 1]),
    (torch.bool, [True, False, False, True]),
])
def test_upload_matches_torch_tensor(dtype, values):
    ring = UploadRing(torch.device("cpu"), nbytes=512)
    out = ring.upload(values, dtype)
    expected = torch.tensor(values, dtype=dtype)
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.equal(out, expected)
    if dtype.is_floating_point:  # -0.0 stays negative
        assert torch.equal(out.signbit(), expected.signbit())


def test_spans_are_aligned_distinct_within_a_lap_and_reused_after_it():
    ring = UploadRing(torch.device("cpu"), nbytes=256)
    first = ring.upload([1, 2, 3], torch.int64)  # 24 bytes at 0
    second = ring.upload([4.0], torch.float32)  # at 64
    assert second.data_ptr() - first.data_ptr() == 64 and ring.laps == 0
    third = ring.upload(list(range(16)), torch.int64)  # 128 bytes at 128: fits exactly
    assert third.data_ptr() - first.data_ptr() == 128 and ring.laps == 0
    assert first.tolist() == [1, 2, 3] and second.tolist() == [4.0] and third.tolist() == list(range(16))
    wrapped = ring.upload([9, 9], torch.int64)  # no room left: back to the start
    assert ring.laps == 1 and wrapped.data_ptr() == first.data_ptr() and wrapped.tolist() == [9, 9]
    with pytest.raises(ValueError, match="does not fit"):
        ring.upload(list(range(40)), torch.int64)


def test_upload_on_the_cpu_is_a_plain_tensor():
    out = upload([1, 2], torch.device("cpu"), torch.int64)
    assert out.tolist() == [1, 2] and out.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_upload_on_cuda_does_not_synchronise():
    device = torch.device("cuda")
    upload([1.0], device, torch.float32)  # creates the ring
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [upload([float(i)] * 100, device, torch.float32) for i in range(50)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(o.tolist() == [float(i)] * 100 for i, o in enumerate(outs))
