"""Incremental detokenisation: the text grows by appending only, never shows half a character, and ends
equal to decoding all the tokens at once."""

import pytest

from marserve import DEFAULT_MODEL_DIR, LLM, SamplingParams
from marserve.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from marserve.loader import load_tokenizer

TEXTS = ["plain ascii words, and numbers 12 + 7 = 19.", "café naïve Ünïcödé", "日本語のテキスト", "emoji 🎉🚀 end",
         "  leading spaces\nand\ttabs  "]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL_DIR)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text):
    prompt = tokenizer("The answer:")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    seen = []
    for t in ids:
        detok.add(t)
        assert REPLACEMENT not in detok.text  # a split character is held back, never shown half-done
        seen.append(detok.text)
    detok.flush()
    assert all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))  # append-only
    assert detok.text == tokenizer.decode(ids)


def test_byte_split_character_is_held_back_then_released(tokenizer):
    ids = tokenizer("🎉", add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        pytest.skip("the tokenizer has this emoji as one token")
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.add(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🎉"


def test_stop_strings_cut_the_text(baby_checkpoint):
    llm = LLM(baby_checkpoint("qwen3_moe"), dtype="float32")
    greedy = dict(max_tokens=24, temperature=0, ignore_eos=True)
    full = llm.generate(["rivers and"], SamplingParams(**greedy))[0].outputs[0]
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if len(stop) < 3 or not stop.strip():
        pytest.skip("random baby model produced too little text")
    at = text.find(stop)
    out = llm.generate(["rivers and"], SamplingParams(stop=[stop], **greedy))[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (text[:at], "stop", stop)
    kept = llm.generate(["rivers and"], SamplingParams(stop=stop, include_stop_str_in_output=True,
                                                       **greedy))[0].outputs[0]
    assert kept.text == text[:at + len(stop)]
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
