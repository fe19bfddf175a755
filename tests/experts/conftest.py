"""Expert-store tests run single-threaded: baby-sized ops gain nothing from threads and the machine is shared."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
