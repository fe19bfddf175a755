"""The request examples in README.md, docs/server.md and docs/client.md set max_tokens and are what they claim to be.

Without max_tokens a chat request to the default model can run to the 1024-token context (~20 s of
silence on a CPU), so every example sets it; the README's first example must not ask the default model,
a text-continuation model, a question.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/server.md", "docs/client.md"]


def _curl_bodies(text: str) -> list[dict]:
    return [json.loads(body) for body in re.findall(r"-d '(\{.*?\})'", text, flags=re.S)]


def _create_calls(text: str) -> list[str]:
    """The argument text of every `...create(...)` call (parentheses matched)."""
    calls = []
    for m in re.finditer(r"\.create\(", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        calls.append(text[m.end():i - 1])
    return calls


@pytest.mark.parametrize("doc", DOCS)
def test_every_request_example_sets_max_tokens(doc):
    text = (ROOT / doc).read_text()
    bodies, calls = _curl_bodies(text), _create_calls(text)
    assert bodies or calls, f"{doc} has no request examples any more: update this test"
    for body in bodies:
        assert "max_tokens" in body, f"{doc}: curl example without max_tokens: {body}"
    for call in calls:
        assert "max_tokens=" in call, f"{doc}: Python example without max_tokens: {call}"


def test_the_readme_first_example_asks_the_default_model_to_continue_text():
    first = _curl_bodies((ROOT / "README.md").read_text())[0]
    assert first["model"] == "marserve-default"
    assert "prompt" in first and "messages" not in first  # a continuation, not a question in a chat
    assert first["temperature"] == 0  # greedy, so the output the README shows is the output one gets
