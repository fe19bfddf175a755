"""Token streams per corpus domain and the seeded, step-indexed batch sampler (so a resumed run sees the same data)."""

from __future__ import annotations

import os

import torch

from marserve.data.corpus import DOMAINS


class DomainStreams:
    """One long token tensor per domain; batch(step) draws windows from domains in turn, seeded by (seed, step)."""

    def __init__(self, tokenizer, corpus_dir: str, split: str = "train", domains=DOMAINS):
        self.domains = [d for d in domains if os.path.exists(os.path.join(corpus_dir, f"{d}.{split}.txt"))]
        if not self.domains:
            from marserve.errors import ConfigError
            raise ConfigError(f"no <domain>.{split}.txt in {corpus_dir}: build it with python -m marserve.data.corpus")
        self.streams = {}
        for d in self.domains:
            with open(os.path.join(corpus_dir, f"{d}.{split}.txt"), encoding="utf-8") as f:
                text = f.read()
            self.streams[d] = torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, list[str]]:
        """[B, seq_len+1] token windows; row b comes from domain (step*B + b) mod #domains."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows, names = [], []
        for b in range(batch_size):
            d = self.domains[(step * batch_size + b) % len(self.domains)]
            s = self.streams[d]
            start = int(torch.randint(0, len(s) - seq_len - 1, (1,), generator=g))
            rows.append(s[start:start + seq_len + 1])
            names.append(d)
        return torch.stack(rows), names
