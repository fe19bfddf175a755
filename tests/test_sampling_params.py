import pytest

from marserve.sampling_params import SamplingParams, SamplingParamsError


def test_defaults_and_normalisation():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and p.top_k == 0 and not p.is_greedy
    assert SamplingParams(temperature=0).is_greedy
    # A top_k beyond any vocabulary keeps every token, and must not overflow the sampler's int64 tensor.
    assert SamplingParams(top_k=2**70).top_k == 0 and SamplingParams(top_k=2**31 - 1).top_k == 2**31 - 1


@pytest.mark.parametrize("kwargs,param", [
    ({"n": 0}, "n"), ({"n": 1000}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"logprobs": 100}, "logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"stop": [""]}, "stop"),
])
def test_out_of_range_names_the_param(kwargs, param):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
