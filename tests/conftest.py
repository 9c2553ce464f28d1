"""Shared test settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests use tiny models, where extra threads only add overhead on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
