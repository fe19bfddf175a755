"""Routing lookup: a forecast of the next decode steps' experts, from an earlier place in the same sequence where the
last two tokens were the same.

Text repeats itself: names and keywords come back, code and tables repeat whole lines, and a small model's greedy
decoding falls into loops of a few tokens. Where the last two tokens of a sequence (the current input and the one
before) occurred together earlier in it, the earlier place predicts this one: the same input in the same
immediate context takes the same experts (MAR routes by the token and its context), and the tokens that followed
there are the likeliest to follow now (what n-gram "prompt lookup" speculative decoding bets on). So each decode
step, a sequence with such a match forecasts its routing for `horizon` steps: step k ahead routes as position
j + k did, j the earlier match (in a loop of period p = pos - j, wrapping round the loop).

The forecast feeds eviction (policies.py, `EvictionPolicy.victim_for`): while it lasts, the store evicts an expert
the forecast does not name before any it names, and of those the one named farthest ahead; a prefetch whose
victim the forecast wants before the prefetched expert waits. Once it has proven right (precision()), the
prefetcher also reads from it (prefetcher.py). Measured in docs/benchmarks.md ("the routing lookup").

A batch forecasts only when every one of its sequences decodes and has a match (a sequence without one could need
any expert). Cost per step: one dict lookup per sequence, then horizon x L x K numbers into a dict.
Legend: T=tokens of a pass, L=MoE layers, K=experts per token.
"""

from __future__ import annotations

import numpy as np


class SequenceRouting:
    """One sequence's input tokens and, for its last `window` positions, the routing each got."""

    FIRST_ROWS = 64  # routing rows to start with; doubled as the sequence grows, up to `window`

    def __init__(self, num_layers: int, top_k: int, window: int):
        self.tokens: list[int] = []
        self.window = window
        rows = min(window, self.FIRST_ROWS)
        self.routing = np.full((rows, num_layers, top_k), -1, dtype=np.int16)  # [rows, L, K] by position % rows
        self.routed = np.full(rows, -1, dtype=np.int64)  # which position each row holds, once routed in every layer
        self.last_pair: dict[int, int] = {}  # (token before, token) -> the latest position that pair ended at
        self.match: int | None = None  # for the current (last) position: the earlier position with the same pair

    def extend(self, token_ids: list[int]) -> None:
        """Append input tokens (their routing follows through record())."""
        for t in token_ids:
            pos = len(self.tokens)
            self.tokens.append(t)
            self.match = None
            if pos:
                pair = (self.tokens[pos - 1] << 32) | (t & 0xFFFFFFFF)
                self.match = self.last_pair.get(pair)
                self.last_pair[pair] = pos
        rows = len(self.routed)
        if rows < min(self.window, len(self.tokens)):  # grow before any position wraps round: rows keep their index
            while rows < min(self.window, len(self.tokens)):
                rows = min(self.window, 2 * rows)
            grown = np.full((rows,) + self.routing.shape[1:], -1, dtype=np.int16)
            grown[:len(self.routed)] = self.routing
            self.routing = grown
            self.routed = np.concatenate([self.routed, np.full(rows - len(self.routed), -1, dtype=np.int64)])

    def record(self, start: int, n: int, position: int, topk_ids: np.ndarray, last_layer: bool) -> None:
        """Positions start..start+n-1 routed MoE position `position` to topk_ids [n,K] (the last `window` kept)."""
        rows = len(self.routed)
        first = max(start, start + n - rows)
        at = np.arange(first, start + n)
        if position == 0:
            self.routed[at % rows] = -1  # being overwritten: no forecast reads them until their last layer is in
        self.routing[at % rows, position] = topk_ids[first - start:]
        if last_layer:
            self.routed[at % rows] = at

    def forecast(self, horizon: int) -> np.ndarray | None:
        """[steps, L, K] the routing the next `horizon` positions are forecast to take, the current one first (fewer
        steps where the earlier place's routing is not known), or None without a match."""
        j = self.match
        if j is None:
            return None
        period = len(self.tokens) - 1 - j
        rows = []
        for k in range(horizon):
            p = j + k % period
            if self.routed[p % len(self.routed)] != p:
                break
            rows.append(p % len(self.routed))
        return self.routing[rows] if rows else None


class RoutingLookup:
    def __init__(self, num_layers: int, top_k: int, horizon: int = 4, window: int = 2048, max_sequences: int = 16,
                 precision_half_life: float = 64.0):
        """horizon: decode steps forecast ahead (the current one included); window: the positions of a sequence
        whose routing is kept (an earlier match is forgotten: at most 2048 x L x K int16, 1.5 MiB a sequence at
        48 layers top-8, grown with the sequence); max_sequences: a pass with more sequences is not forecast and
        nothing is kept (every one of them would need a match, and their union of experts covers most of a pool
        anyway); precision_half_life: forecast experts after which an old one counts half in precision()."""
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        self.num_layers, self.top_k, self.horizon, self.window = num_layers, top_k, horizon, window
        self.max_sequences = max_sequences
        self._sequences: dict[object, SequenceRouting] = {}
        self._rows: list[tuple[SequenceRouting, int, int]] = []  # the current pass: (sequence, first position, n)
        self._expected: list[np.ndarray] | None = None  # per row of this pass: its forecast for this pass [L,K]
        self._fade = 0.5 ** (1.0 / precision_half_life)
        self._right = self._made = 0.0  # decayed counts: forecast experts the pass then used, forecast experts
        self.forecasts = 0  # steps with a forecast
        self.steps = 0  # decode steps seen

    def begin_pass(self, seq_keys: list, token_ids: list[list[int]], start_pos: list[int],
                   is_prefill: list[bool]) -> list[np.ndarray] | None:
        """A forward pass over these sequences' chunks (token_ids[i] from position start_pos[i]) is about to run ->
        each sequence's forecast [steps, L, K] (this pass first; forecast_uses turns them into fetch distances), or
        None when the pass is not forecast. Sequences not in the pass are forgotten (their memory would only
        grow; one that comes back starts over)."""
        seen = {}
        self._rows = []
        self._expected = None
        if len(seq_keys) > self.max_sequences:
            self._sequences = {}
            return None
        for key, ids, start, prefill in zip(seq_keys, token_ids, start_pos, is_prefill):
            seq = self._sequences.get(key)
            if seq is None or len(seq.tokens) != start:
                seq = SequenceRouting(self.num_layers, self.top_k, self.window)  # new, or its history is another's
                if start:
                    seq.extend([-1] * start)  # positions computed before (prefix cache): unknown
            seq.extend(list(ids))
            self._rows.append((seq, start, len(ids)))
            seen[key] = seq
        self._sequences = seen
        if any(is_prefill) or not self._rows:
            return None
        self.steps += 1
        found = [seq.forecast(self.horizon) for seq, _, _ in self._rows]
        if any(f is None for f in found):
            return None
        self.forecasts += 1
        self._expected = [f[0] for f in found]
        return found

    def precision(self) -> float:
        """The share of forecast experts that the pass they were forecast for then used (this pass's forecasts
        only: the ones further ahead are checked again when their pass comes), decayed; 0 before any."""
        return self._right / self._made if self._made else 0.0

    def record(self, position: int, topk_ids: np.ndarray) -> None:
        """MoE position `position` routed the pass's rows: topk_ids [T,K] in begin_pass's order (a pass of another
        shape, e.g. one no begin_pass announced, is ignored)."""
        if sum(n for _, _, n in self._rows) != topk_ids.shape[0] or topk_ids.shape[1] != self.top_k:
            return
        row = 0
        for seq, start, n in self._rows:
            seq.record(start, n, position, topk_ids[row:row + n], position == self.num_layers - 1)
            row += n
        if self._expected is not None:  # decode rows: one per sequence
            for expected, used in zip(self._expected, topk_ids.tolist()):
                wanted = [e for e in expected[position].tolist() if e >= 0]
                right = sum(e in used for e in wanted)
                self._right = self._right * self._fade ** len(wanted) + right
                self._made = self._made * self._fade ** len(wanted) + len(wanted)


def forecast_uses(forecasts: list[np.ndarray], num_layers: int) -> list[dict[int, list[int]]]:
    """Per-sequence forecasts [steps, L, K] -> per MoE position: expert -> the fetches from now at which it is
    forecast to be used, ascending (one fetch per MoE layer and pass: step k's position i is fetch k L + i + 1)."""
    uses: list[dict[int, list[int]]] = [{} for _ in range(num_layers)]
    for f in forecasts:
        for k, step in enumerate(f.tolist()):
            for i, experts in enumerate(step):
                at = k * num_layers + i + 1
                layer = uses[i]
                for e in experts:
                    if e >= 0:
                        layer.setdefault(e, []).append(at)
    for layer in uses:
        for e, ats in layer.items():
            if len(ats) > 1:
                layer[e] = sorted(set(ats))
    return uses
