"""The replay's held-out text: a second trace part is other text of the same size, domain by domain."""

import pytest

from marserve.bench import expert_traces as et
from marserve.errors import ConfigError


def _positions(text, add_special_tokens=False):
    """A stand-in tokenizer: one id per word, the id being the word's position (so a window says where it came from)."""
    return {"input_ids": list(range(len(text.split())))}


def test_trace_parts_are_disjoint_slices_of_the_same_size():
    calib0, part0 = et._windows(_positions, max_tokens=500, window=64)
    calib1, part1 = et._windows(_positions, max_tokens=500, window=64, part=1)
    assert calib0 == calib1  # calibration text is the same: only the trace moves on
    assert sum(map(len, part0)) == sum(map(len, part1)) == 500
    assert len(part0) == len(part1)
    for w0, w1 in zip(part0, part1):  # the same domain, in order: part 1 starts after what part 0 took
        assert w1[0] >= w0[-1] + 1 and w1[0] % 64 == 0


def test_a_part_beyond_the_text_is_an_error():
    with pytest.raises(ConfigError, match="too few windows"):
        et._windows(_positions, max_tokens=500, window=64, part=10_000)
