"""Turning generated token ids into text as they arrive, without re-decoding the whole output each step.

Byte-level BPE can split one character over several tokens, and decoders that strip a leading space
(SentencePiece's metaspace) decode a token differently at the start of a text than after others.
So each step decodes only a short window of recent tokens twice - with and without the newest - and
appends the difference; a window that ends in a half character (U+FFFD) waits for more tokens.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 4  # prompt tokens decoded before the first output token, so it keeps its leading space


def stable_text(text: str, finished: bool) -> str:
    """The part of a running sequence's decoded text that will not change when more tokens arrive."""
    if finished:
        return text
    return text.rstrip(REPLACEMENT)


class IncrementalDetokenizer:
    """The text of one sequence's output so far; `add` costs a window decode, not a full one."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self._tokens = context  # the window's source: prompt context, then outputs
        self._prefix_offset = 0  # window start
        self._read_offset = len(context)  # tokens before this are already in `text`
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completed (possibly empty while a character is split)."""
        self._tokens.append(token_id)
        before = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        after = self._decode(self._tokens[self._prefix_offset:])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""  # a character still incomplete (or a token with no text yet): wait
        new = after[len(before):]
        self.text += new
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return new

    def flush(self) -> str:
        """At the end: whatever is still held back, replacement characters and all."""
        if self._read_offset == len(self._tokens):
            return ""
        before = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        after = self._decode(self._tokens[self._prefix_offset:])
        new = after[len(before):]
        self.text += new
        self._prefix_offset = self._read_offset = len(self._tokens)
        return new
