"""SamplingParams: how one request wants its tokens chosen and when it stops (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass, field

# n above this is refused: each of the n sequences holds its own KV blocks.
MAX_N = 16
MAX_LOGPROBS = 20

TOP_K_ALL = 2**31  # a top_k from here on keeps the whole vocabulary


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None = up to the context limit
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token (0 = just the chosen one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1 or (isinstance(self.top_k, int) and self.top_k >= TOP_K_ALL):
            self.top_k = 0  # more than any vocabulary keeps every token: off (and no int64 overflow)
        self._check("n", 1 <= self.n <= MAX_N, f"must be between 1 and {MAX_N}")
        self._check("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1")
        self._check("min_tokens", self.min_tokens >= 0, "must be non-negative")
        self._check("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
                    "must not exceed max_tokens")
        self._check("temperature", self.temperature >= 0.0, "must be non-negative")
        self._check("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]")
        self._check("top_k", self.top_k >= 0, "must be -1 (off), 0 (off) or positive")
        self._check("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]")
        self._check("repetition_penalty", self.repetition_penalty > 0.0, "must be positive")
        self._check("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]")
        self._check("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]")
        self._check("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                    f"must be between 0 and {MAX_LOGPROBS}")
        self._check("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                    f"must be between 0 and {MAX_LOGPROBS}")
        self._check("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings")

    @staticmethod
    def _check(param: str, ok: bool, what: str) -> None:
        if not ok:
            raise SamplingParamsError(param, f"{param} {what}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `param` names it (the HTTP layer reports it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
