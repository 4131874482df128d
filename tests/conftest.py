"""Fixtures shared by the whole suite."""

import os

import pytest
import torch
from hypothesis import settings

# The same examples on every run (CI must not pass or fail by chance); HYPOTHESIS_PROFILE=explore
# draws fresh ones, for a search for new failures.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests run tiny models: one intra-op thread is several times faster than contended
    threads on a small, busy CI machine (2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
