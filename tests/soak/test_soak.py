"""The soak as a test: skipped unless MARSERVE_SOAK_MINUTES is set (scripts/soak.sh sets 30; scripts/test.sh
runs the 3-minute form). Every check of tests/soak/soak.py must pass; the table is printed either way."""

from __future__ import annotations

import os

import pytest

from tests.soak import soak

MINUTES = os.environ.get("MARSERVE_SOAK_MINUTES")


@pytest.mark.slow
@pytest.mark.skipif(not MINUTES, reason="the soak runs only when MARSERVE_SOAK_MINUTES is set (scripts/soak.sh)")
def test_soak(tmp_path, capsys):
    argv = ["--minutes", MINUTES, "--out", str(tmp_path)]
    if float(MINUTES) < 10:  # the first minute is warm-up (RSS rises ~25% as the caches and the heap fill)
        argv += ["--warmup-fraction", "0.5"]
    if os.environ.get("MARSERVE_SOAK_EXPERT_CACHE"):
        argv += ["--expert-cache", os.environ["MARSERVE_SOAK_EXPERT_CACHE"]]
    code = soak.main(argv)
    with capsys.disabled():
        print(capsys.readouterr().out)
    assert code == 0, f"a soak check failed (table above; server log in {tmp_path})"
