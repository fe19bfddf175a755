"""What the soak's clients send: a mix of ordinary requests, greedy ones with references, injected faults
and hostile requests (the cases of issue 22 and docs/server.md, each with the status it must get)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.soak.faulty_serve import FAULT_SEED

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
# Shares of all requests (the rest are ordinary sampled requests).
GREEDY_SHARE, DISCONNECT_SHARE, HOSTILE_SHARE, FAULT_SHARE = 0.25, 0.10, 0.01, 0.005
NUM_GREEDY_REQUESTS = 24  # distinct greedy requests, each with a reference run alone
_PROSE = re.compile(r"^[A-Za-z][A-Za-z'.,;:()-]{0,13}$")
STOP_STRINGS = ["\n\n", ".", " the", "```", "\n", ":"]


@dataclass
class Spec:
    """One request to send. kind: normal, greedy, fault or hostile."""

    kind: str
    path: str
    body: dict | bytes | None
    method: str = "POST"
    auth: str | None = "key"  # "key" = the server's key, None = no header, else that bearer token
    disconnect_after_chunks: int | None = None  # a stream left by its client after this many events
    expect_status: int | None = None  # hostile: the status it must get
    name: str = ""  # hostile: the case's name; greedy: the reference's key
    extra: dict = field(default_factory=dict)

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and bool(self.body.get("stream"))


def corpus_words() -> list[str]:
    """Words of the repository's own docs: text of realistic token lengths, the same on every run (prose words
    only: a table's rule or a path costs many tokens, and a long prompt of them would not fit the context)."""
    root = Path(__file__).resolve().parents[2]
    words = []
    for path in sorted([root / "README.md", *sorted((root / "docs").glob("*.md"))]):
        words += [w for w in path.read_text(encoding="utf-8").split() if _PROSE.match(w)]
    return words or "the quick brown fox jumps over the lazy dog".split()


def _prompt(rng: random.Random, words: list[str]) -> str:
    # Mostly short, some medium, a few long (up to ~700 tokens: with max_tokens they fit the 1024 context).
    n = rng.choices([rng.randint(1, 12), rng.randint(12, 120), rng.randint(120, 380)], weights=[50, 35, 15])[0]
    start = rng.randrange(max(1, len(words) - n))
    return " ".join(words[start:start + n])


def _body(rng: random.Random, words: list[str], greedy: bool) -> tuple[str, dict]:
    chat = rng.random() < 0.2
    body: dict = {"model": "marserve-default", "max_tokens": rng.randint(1, 48)}
    if greedy:
        body["temperature"] = 0
    else:
        body["temperature"] = rng.choice([0.7, 1.0])
        if rng.random() < 0.3:
            body["top_p"] = 0.9
        if rng.random() < 0.3:
            body["seed"] = rng.randrange(2**31)
    if rng.random() < 0.25:
        body["n"] = rng.randint(2, 4)
    if rng.random() < 0.2:
        body["stop"] = rng.sample(STOP_STRINGS, rng.randint(1, 2))
    if chat:
        body["messages"] = [{"role": "user", "content": _prompt(rng, words)}]
        if rng.random() < 0.1:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
        return CHAT, body
    body["prompt"] = _prompt(rng, words)
    r = rng.random()
    if r < 0.15:  # the path whose native memory grew (issue 22 item 2)
        body["echo"], body["logprobs"] = True, rng.randint(0, 5)
    elif r < 0.25:
        body["logprobs"] = rng.randint(0, 5)
    return COMPLETIONS, body


def greedy_requests() -> list[tuple[str, dict]]:
    """The distinct greedy requests (path, body without `stream`), the same on every run."""
    rng, words = random.Random(22), corpus_words()
    return [_body(rng, words, greedy=True) for _ in range(NUM_GREEDY_REQUESTS)]


def hostile_cases() -> list[Spec]:
    ok = {"model": "marserve-default", "prompt": "hello", "max_tokens": 4}
    chat_ok = {"model": "marserve-default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ("stop_token_id_out_of_vocab_min_tokens", {**ok, "stop_token_ids": [999999], "min_tokens": 4}, 400),
        ("negative_stop_token_id", {**ok, "stop_token_ids": [-1]}, 400),
        ("prompt_token_id_out_of_vocab", {**ok, "prompt": [1, 2, 999999]}, 400),
        ("negative_prompt_token_id", {**ok, "prompt": [5, -3]}, 400),
        ("too_many_stop_token_ids", {**ok, "stop_token_ids": list(range(257))}, 400),
        ("too_many_stop_strings", {**ok, "stop": ["a"] * 17}, 400),
        ("stop_string_too_long", {**ok, "stop": ["x" * 1025]}, 400),
        ("prompt_chars_beyond_context", {**ok, "prompt": "ab " * 22000}, 400),
        ("too_many_prompts", {**ok, "prompt": ["hi"] * 257}, 400),
        ("more_sequences_than_the_queue", {**ok, "prompt": ["hi"] * 200, "n": 2}, 400),
        ("n_above_16", {**ok, "n": 17}, 400),
        ("temperature_out_of_range", {**ok, "temperature": 3}, 400),
        ("repetition_penalty_zero", {**ok, "repetition_penalty": 0}, 400),
        ("seed_beyond_64_bits", {**ok, "seed": 2**70}, 400),
        ("prompt_plus_max_tokens_beyond_context", {**ok, "max_tokens": 5000}, 400),
        ("max_tokens_zero", {**ok, "max_tokens": 0}, 400),
        ("empty_prompt", {**ok, "prompt": ""}, 400),
        ("suffix", {**ok, "suffix": "x"}, 400),
        ("best_of_not_n", {**ok, "best_of": 3}, 400),
        ("unknown_model", {**ok, "model": "nope"}, 404),
        ("invalid_json", b'{"prompt": "hello", "max_tokens": ', 400),
        ("lone_surrogate", b'{"prompt": "\\ud800 hi", "max_tokens": 2}', 400),
        ("body_above_max_body_mb", b'{"prompt": "' + b"a" * (4 * 2**20 + 1024) + b'"}', 413),
    ]
    specs = [Spec("hostile", COMPLETIONS, body, expect_status=status, name=name) for name, body, status in cases]
    specs += [
        Spec("hostile", COMPLETIONS, ok, auth=None, expect_status=401, name="no_api_key"),
        Spec("hostile", COMPLETIONS, ok, auth="wrong-key", expect_status=401, name="wrong_api_key"),
        Spec("hostile", COMPLETIONS, None, method="GET", expect_status=405, name="wrong_method"),
        Spec("hostile", CHAT, {**chat_ok, "messages": []}, expect_status=400, name="chat_no_messages"),
        Spec("hostile", CHAT, {**chat_ok, "tools": [{"type": "function", "function": {"name": "f"}}]},
             expect_status=400, name="chat_tools"),
        Spec("hostile", CHAT, {**chat_ok, "response_format": {"type": "json_object"}}, expect_status=400,
             name="chat_response_format_json"),
        Spec("hostile", CHAT, {**chat_ok, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, expect_status=400,
             name="chat_image_part"),
        Spec("hostile", CHAT, {**chat_ok, "messages": [{"role": "user", "content": "x " * 40000}]},
             expect_status=400, name="chat_beyond_context"),
    ]
    return specs


class Workload:
    """Draws the next request; deterministic for a given seed (each client has its own)."""

    def __init__(self, seed: int, greedy: list[tuple[str, dict]], hostile: list[Spec]):
        self.rng, self.words = random.Random(seed), corpus_words()
        self.greedy, self.hostile = greedy, hostile

    def next(self) -> Spec:
        rng = self.rng
        r = rng.random()
        if r < HOSTILE_SHARE:
            return rng.choice(self.hostile)
        if r < HOSTILE_SHARE + FAULT_SHARE:
            body = {"model": "marserve-default", "prompt": _prompt(rng, self.words), "max_tokens": rng.randint(2, 24),
                    "temperature": 1.0, "seed": FAULT_SEED, "stream": rng.random() < 0.5}
            return Spec("fault", COMPLETIONS, body)
        if r < HOSTILE_SHARE + FAULT_SHARE + DISCONNECT_SHARE:  # a stream its client leaves mid-way
            path, body = _body(rng, self.words, greedy=False)
            body.update(stream=True, max_tokens=rng.randint(16, 64))
            return Spec("normal", path, body, disconnect_after_chunks=rng.randint(1, 6))
        stream = rng.random() < 0.5
        if r < HOSTILE_SHARE + FAULT_SHARE + DISCONNECT_SHARE + GREEDY_SHARE:
            i = rng.randrange(len(self.greedy))
            path, body = self.greedy[i]
            return Spec("greedy", path, {**body, "stream": stream}, name=f"g{i}-{'s' if stream else 'w'}")
        path, body = _body(rng, self.words, greedy=False)
        body["stream"] = stream
        if stream and rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
        return Spec("normal", path, body)
