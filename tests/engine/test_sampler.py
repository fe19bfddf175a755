import math

import torch

from marserve.engine.sampler import Sampler, apply_penalties, truncation_mask
from marserve.sampling_params import SamplingParams


def test_greedy_rows_take_argmax_and_report_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    out = Sampler()(logits, [SamplingParams(temperature=0, logprobs=2)] * 2)
    assert out.token_ids == [1, 0]
    torch.testing.assert_close(out.logprobs, logits.log_softmax(-1)[[0, 1], [1, 0]])
    assert out.top_ids.tolist() == [[1, 2], [0, 1]]


def test_truncation_masks_match_direct_definitions():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = logits.softmax(-1)[0]
    cut = truncation_mask(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert cut[0].tolist() == [False, False, True, True, True]
    # top_p: smallest set of most likely tokens whose mass reaches p
    p = float(probs[:2].sum()) + 1e-4
    cut = truncation_mask(logits, torch.tensor([0]), torch.tensor([p]), torch.tensor([0.0]))
    assert cut[0].tolist() == [False, False, False, True, True]
    # min_p: tokens below min_p * max prob are cut
    m = float(probs[2] / probs[0]) + 1e-4
    cut = truncation_mask(logits, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([m]))
    assert cut[0].tolist() == [False, False, True, True, True]


def test_penalties_match_direct_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, [p], prompt_ids=[[3]], output_ids=[[0, 0, 1]])
    want = torch.tensor([[2.0 / 2 - 0.25 * 2 - 0.5, -1.0 * 2 - 0.25 - 0.5, 0.5, 1.0 / 2]])
    torch.testing.assert_close(got, want)


def test_top_k_one_is_greedy_and_samples_follow_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]] * 4000)
    assert set(Sampler()(logits[:50], [SamplingParams(top_k=1)] * 50).token_ids) == {0}
    ids = torch.tensor(Sampler()(logits, [SamplingParams(temperature=1.0)] * 4000).token_ids)
    freq = torch.bincount(ids, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_seeded_rows_are_reproducible_alone_or_in_a_batch():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [Sampler()(logits[1:2], [p], generators=[torch.Generator().manual_seed(7)]).token_ids[0]
             for _ in range(3)]
    batch = Sampler()(logits, [SamplingParams(temperature=1.0), p, SamplingParams(temperature=0)],
                      generators=[None, torch.Generator().manual_seed(7), None]).token_ids
    assert len(set(alone)) == 1 and batch[1] == alone[0]


def test_suppressed_tokens_are_never_chosen():
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    assert Sampler()(logits, [SamplingParams(temperature=0)], suppressed=[[0]]).token_ids[0] != 0
