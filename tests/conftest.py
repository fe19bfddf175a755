"""Shared fixtures: a session-wide cache of baby checkpoints built once per distinct set of arguments."""

from __future__ import annotations

import pytest

from tests.baby_models import make_baby_checkpoint


@pytest.fixture(scope="session")
def baby_checkpoint(tmp_path_factory):
    """Factory: baby_checkpoint(model_type, **kw) -> Path of a (cached) baby checkpoint directory."""
    cache = {}

    def build(model_type: str, **kw):
        key = (model_type, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"baby-{model_type}")
            cache[key] = make_baby_checkpoint(path, model_type, **kw)
        return cache[key]

    return build



@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (restored after): baby-sized ops gain nothing from threads, and the
    test machine is shared. Folders of such tests make it autouse in their own conftest.py."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
