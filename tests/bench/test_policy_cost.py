"""`python -m marserve.bench.policy_cost` at a small shape: every column is timed and printed; no timing checked."""

from marserve.bench.policy_cost import main, measure


def test_policy_cost_times_victim_fetch_events_and_the_forecast(capsys):
    for name in ("lru", "mar"):
        r = measure(name, layers=4, experts=128, top_k=2, steps=4, calls=5)
        assert r["keys"] == 512 and r["victim_us"] > 0 and r["fetch_us"] > 0
        assert r["forecast_victim_us"] > 0 and r["forecast_step_us"] > 0
    assert main(["--layers", "4", "--top-k", "2", "--steps", "4", "--calls", "5", "--policies", "lru"]) == 0
    out = capsys.readouterr().out
    assert "victim_for() under a forecast" in out and "command: python -m marserve.bench.policy_cost" in out
