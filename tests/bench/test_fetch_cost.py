"""`python -m marserve.bench.fetch_cost` on a baby model: it times all-hit fetches and says so; no timing checked."""

from marserve.bench.fetch_cost import main, measure
from tests.experts.checkpoints import SIZES


def test_fetch_cost_times_every_layer_with_resident_experts_and_prints_its_command(baby_checkpoint, capsys):
    path = baby_checkpoint("mixtral", **SIZES)  # 4 MoE layers x 8 experts, top-2: 25% = 8 slots, 2 per layer
    r = measure(str(path), 0.5, tokens=1, calls=40)
    assert r["layers"] >= 1 and r["fetch_us"] > 0 and r["store_us"] > 0
    assert main(["--model", str(path), "--expert-cache", "0.5", "--calls", "40", "--repeats", "1", "--tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "all-hit fetch, 3 token(s), policy mar" in out and "us per layer" in out
    assert "command: python -m marserve.bench.fetch_cost --model" in out and "host: " in out
