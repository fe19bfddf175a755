"""Offline generation API: LLM(model_dir).generate(prompts, SamplingParams) -> list[RequestOutput].

All prompts go into the continuous-batching engine at once; results come back in prompt order.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

from tqdm import tqdm

from marserve import progress
from marserve.engine_config import EngineConfig
from marserve.errors import ConfigError
from marserve.engine.llm_engine import LLMEngine
from marserve.outputs import RequestOutput
from marserve.sampling_params import SamplingParams

_ids = itertools.count()


class LLM:
    def __init__(self, model: str | Path, dtype: str = "auto", device: str = "cpu", seed: int = 0, **engine_kwargs):
        """engine_kwargs: kv_cache_gb, block_size, max_num_seqs, max_num_batched_tokens, max_model_len,
        enable_prefix_caching, expert_cache, expert_cache_gb, expert_policy, prefetch (see
        marserve.engine_config.EngineConfig; docs/offload.md for the expert ones)."""
        self.model_dir = Path(model)
        self.engine = LLMEngine(EngineConfig(model=self.model_dir, dtype=dtype, device=device, seed=seed,
                                             **engine_kwargs))
        self.model, self.config = self.engine.model, self.engine.model_config
        self.tokenizer = self.engine.tokenizer
        self.generation_defaults = self.engine.generation_defaults
        # generate() may be called from several threads: one of them steps the engine at a time, and a request's
        # finished output waits in _done for the thread that asked for it.
        self._lock = threading.Lock()
        self._done: dict[str, RequestOutput] = {}

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams carrying the checkpoint's generation_config.json defaults."""
        return SamplingParams(**{k: v for k, v in self.generation_defaults.items() if k != "eos_token_ids"})

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, token-id lists, or {"prompt_token_ids": [...]} dicts.

        use_tqdm: a progress bar with the output speed (default: when several prompts go to a terminal and the
            command line was not given --quiet; marserve/progress.py)."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.default_sampling_params()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        ids = [f"offline-{next(_ids)}" for _ in prompts]
        with self._lock:
            try:
                for rid, prompt, p in zip(ids, prompts, params):
                    self.engine.add_request(rid, prompt, p)
            except Exception:
                for rid in ids:
                    self.engine.abort(rid)
                raise
        if use_tqdm is None:
            use_tqdm = len(ids) > 1 and progress.is_enabled()  # a terminal, and no --quiet
        mine, done = set(ids), 0
        start, generated = time.perf_counter(), self.engine.generation_tokens_total
        with tqdm(total=len(ids), desc="requests", unit="req", disable=not use_tqdm) as bar:
            while done < len(ids):
                with self._lock:  # another thread's step may have finished some of ours
                    if not self.engine.has_unfinished and not mine <= self._done.keys():
                        raise RuntimeError("the engine has nothing left to run but requests of this call are "
                                           "unfinished")
                    outputs = self.engine.step() if self.engine.has_unfinished else []
                    for out in outputs:
                        if out.finished:
                            self._done[out.request_id] = out
                    finished = sum(rid in self._done for rid in mine)
                if finished > done:
                    bar.update(finished - done)
                    done = finished
                    rate = (self.engine.generation_tokens_total - generated) / (time.perf_counter() - start)
                    bar.set_postfix_str(f"output {rate:.1f} tok/s", refresh=False)
        with self._lock:
            return [self._done.pop(rid) for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool | None = None) -> list[RequestOutput]:
        """One conversation ([{"role", "content"}, ...]) or a list of them, through the tokenizer's chat
        template (with the generation prompt) -> one RequestOutput per conversation."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"{self.model_dir}: the tokenizer has no chat template; use generate()")
        prompts = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            # The template holds the special tokens it wants: no second BOS.
            prompts.append({"prompt": text,
                            "prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
