"""Model tests run single-threaded: baby-sized ops gain nothing from threads and the test machine is shared."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield
