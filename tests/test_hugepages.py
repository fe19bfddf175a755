import pytest
import torch

from marserve import hugepages
from marserve.loader import load_model


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unavailable"
    return text.split("[")[1].split("]")[0]


def test_small_tensors_are_plain_and_shapes_dtypes_hold():
    t = hugepages.empty((3, 5), torch.float32)
    assert t.shape == (3, 5)
    big = hugepages.empty((3, 2**20), torch.bfloat16)
    assert big.shape == (3, 2**20) and big.dtype == torch.bfloat16 and big.is_contiguous()
    assert big.data_ptr() % hugepages.HUGE_PAGE == 0


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_large_weights_land_on_huge_pages(tmp_path):
    from tests.baby_models import make_baby_checkpoint
    path = make_baby_checkpoint(tmp_path / "m", "mixtral", hidden_size=256, num_layers=1, num_experts=8)
    model, _ = load_model(path, dtype="float32")
    w13 = next(p for n, p in model.named_parameters() if n.endswith("experts.w13"))  # [8, 1024, 256] = 8 MiB
    assert w13.numel() * 4 >= 2 * hugepages.HUGE_PAGE
    assert hugepages.huge_page_bytes(w13) >= hugepages.HUGE_PAGE
