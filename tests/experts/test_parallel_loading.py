"""Under expert parallelism a rank loads only its own experts (no process group needed to load)."""

import torch

from marserve.experts import placement as pl
from marserve.experts.parallel import ExpertParallelGroup, ParallelExperts, shard_experts
from marserve.loader import load_model


def test_a_rank_keeps_only_its_experts(baby_checkpoint):
    path = baby_checkpoint("mixtral")
    full, config = load_model(path, dtype="float32")
    placement = pl.Placement("x", 2, torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]]))
    group = ExpertParallelGroup(rank=1, world_size=2, placement=placement)
    model, _ = load_model(path, dtype="float32", prepare=lambda m: shard_experts(m, group))
    for i, (whole, part) in enumerate(zip(full.moe_blocks(), model.moe_blocks())):
        assert isinstance(part.experts, ParallelExperts) and part.experts.resident() is None
        held = placement.local_experts(i, 1)  # layer 0: experts 0 and 3; layer 1: experts 1 and 2
        assert part.experts.w13.shape[0] == len(held) == 2
        assert torch.equal(part.experts.w13, whole.experts.w13[held])
        assert torch.equal(part.experts.w2, whole.experts.w2[held])
        assert [part.experts.local_slot(e) for e in range(4)] == [held.index(e) if e in held else None
                                                                  for e in range(4)]
