"""Text that is safe to show while a sequence is still generating.

Byte-level BPE can split one character over several tokens; decoding a prefix of them yields U+FFFD
at the end. Until more tokens complete the character, that tail is held back.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


def stable_text(text: str, finished: bool) -> str:
    """The part of a running sequence's decoded text that will not change when more tokens arrive."""
    if finished:
        return text
    return text.rstrip(REPLACEMENT)
