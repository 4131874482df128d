"""Kernel tests run the Triton kernels through the Triton interpreter on CPU.

TRITON_INTERPRET must be set before triton is imported anywhere, hence at the very top here.
On a machine with CUDA, set SHAREDECODE_TEST_CUDA=1 to run the same tests on the GPU instead.
"""
import os

if os.environ.get("SHAREDECODE_TEST_CUDA", "0") == "0":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    if os.environ.get("SHAREDECODE_TEST_CUDA", "0") != "0":
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed(request):
    # a fresh but reproducible draw per test
    torch.manual_seed(hash(request.node.nodeid) % (2**31))


@pytest.fixture
def pdl_path(monkeypatch, device):
    """Run the kernels' programmatic-dependent-launch code path (its early loads of constants).
    The interpreter has no grid-dependency ops: there they are no-ops (a kernel runs alone
    anyway); on a GPU (SHAREDECODE_TEST_CUDA=1) the real launch with PDL is used."""
    import triton.language as tl

    from sharedecode.kernels import pdl

    monkeypatch.setattr(pdl, "ENABLED", True)
    if device.type != "cuda":
        monkeypatch.setattr(tl.extra.cuda, "gdc_wait", lambda: None, raising=False)
        monkeypatch.setattr(tl.extra.cuda, "gdc_launch_dependents", lambda: None, raising=False)
        monkeypatch.setattr(pdl, "applies", lambda device: True)
        monkeypatch.setattr(pdl, "launch_options", lambda on: {})
