"""Routing metrics on hand-made routings with known answers, and the analysis end to end on a baby checkpoint."""

from __future__ import annotations

import argparse
import json

import torch

from marserve.analysis import routing_metrics as rm


def test_lru_and_reuse_known_answers():
    ids = torch.tensor([[0, 1], [0, 1], [2, 3], [0, 1]])
    seq = torch.zeros(4, dtype=torch.long)
    assert rm.next_token_reuse(ids, seq) == (2 + 0 + 0) / 6
    assert rm.lru_hit_rate(ids, seq, capacity=4) == 4 / 8      # 0,1 miss; hit,hit; 2,3 miss; hit,hit
    assert rm.lru_hit_rate(ids, seq, capacity=2) == 2 / 8      # 0,1 evicted by 2,3
    assert rm.lru_hit_rate(ids, torch.tensor([0, 1, 2, 3]), capacity=4) == 0.0   # a new sequence empties the cache


def test_consistency_and_mutual_information_extremes():
    tokens = torch.tensor([5] * 6 + [7] * 6)
    same = torch.tensor([[0, 1]] * 6 + [[2, 3]] * 6)
    assert rm.routing_consistency(tokens, same) == 1.0
    spread = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [2, 3]] * 2)
    assert rm.routing_consistency(tokens, spread) == 0.5
    mi, norm = rm.domain_expert_mutual_information({"a": torch.tensor([[0, 1]]), "b": torch.tensor([[2, 3]])}, 4)
    assert abs(mi - 1.0) < 1e-9 and abs(norm - 1.0) < 1e-9
    mi, _ = rm.domain_expert_mutual_information({"a": torch.tensor([[0, 1]]), "b": torch.tensor([[0, 1]])}, 4)
    assert abs(mi) < 1e-9
    assert rm.coefficient_of_variation(rm.expert_load(torch.tensor([[0, 1], [2, 3]]), 4)) == 0.0


def test_prediction_precision():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    actual = torch.tensor([[0, 1], [0, 1]])
    assert rm.prediction_precision(scores, actual, 2) == 0.5
    assert rm.prediction_recall(scores, actual, 4) == 1.0


def test_analysis_end_to_end(mar_ckpt, tmp_path):
    from marserve.analysis.routing import run
    out, _ = mar_ckpt
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"domain": d, "text": t}) for d, t in
                                 [("math", "12 + 30 = 42\n7 * 6 = 42\n" * 8), ("csv", "id,name\n1,bob\n2,alice\n" * 8)]))
    args = argparse.Namespace(model_dir=str(out), prompts=str(prompts), routing_json=str(tmp_path / "r.json"),
                              routing_png=str(tmp_path / "r.png"), routing_seq_len=32, routing_max_tokens=200)
    assert run(args) == 0
    report = json.load(open(tmp_path / "r.json"))
    assert report["domains"] == ["math", "csv"] and len(report["layers"]) == 2
    l0 = report["layers"][0]
    assert abs(sum(l0["load"]) - 1) < 1e-3 and abs(sum(l0["usage"]) - 1) < 1e-3
    assert 0 <= l0["next_layer_precision_at_k"] <= 1 and 0 <= l0["domain_mi_normalised"] <= 1
    assert "next_layer_precision_at_k" not in report["layers"][1]      # no layer after the last
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zlib_png_writer(tmp_path):
    from marserve.analysis.png import write_png_rgb
    write_png_rgb(str(tmp_path / "x.png"), [[(255, 0, 0), (0, 0, 255)]])
    data = (tmp_path / "x.png").read_bytes()
    assert data.startswith(b"\x89PNG") and b"IHDR" in data and data.endswith(b"IEND\xaeB`\x82")
