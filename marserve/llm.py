"""Offline generation API: LLM(model_dir).generate(prompts, SamplingParams) -> list[RequestOutput].

First version: batched, dense attention, whole sequences recomputed every step (correctness first; the
continuous-batching engine replaces the internals and keeps this API).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from marserve.attention import AttentionMetadata
from marserve.loader import generation_defaults, load_model, load_tokenizer
from marserve.outputs import CompletionOutput, RequestOutput
from marserve.sampling_params import SamplingParams

_ids = itertools.count()


class LLM:
    def __init__(self, model: str | Path, dtype: str = "auto", device: str = "cpu", seed: int = 0):
        self.model_dir = Path(model)
        self.model, self.config = load_model(self.model_dir, dtype=dtype, device=device)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.generation_defaults = generation_defaults(self.model_dir, self.config)
        self.eos_token_ids = set(self.generation_defaults.get("eos_token_ids") or self.config.eos_token_id)
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams carrying the checkpoint's generation_config.json defaults."""
        return SamplingParams(**{k: v for k, v in self.generation_defaults.items() if k != "eos_token_ids"})

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or lists of token ids (or {"prompt_token_ids": [...]})."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.default_sampling_params()
        params = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self._prepare(p) for p in prompts]
        outputs = self._run([ids for _, ids in reqs], params)
        return [RequestOutput(request_id=str(next(_ids)), prompt=text, prompt_token_ids=ids, outputs=[out],
                              finished=True) for (text, ids), out in zip(reqs, outputs)]

    def _prepare(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, dict):
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        return None, list(prompt)

    @torch.no_grad()
    def _run(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> list[CompletionOutput]:
        max_len = self.config.max_position_embeddings
        gen: list[list[int]] = [[] for _ in prompt_ids]
        finish: list[str | None] = [None] * len(prompt_ids)
        stop_reason: list = [None] * len(prompt_ids)
        # A seeded request draws from its own generator so its tokens do not depend on its batch-mates.
        gens = [self.generator if p.seed is None else torch.Generator(self.device).manual_seed(p.seed) for p in params]
        while True:
            active = [i for i, f in enumerate(finish) if f is None]
            if not active:
                break
            seqs = [prompt_ids[i] + gen[i] for i in active]
            ids = torch.tensor([t for s in seqs for t in s], device=self.device)
            pos = torch.cat([torch.arange(len(s), device=self.device) for s in seqs])
            hidden = self.model(ids, pos, AttentionMetadata.dense([len(s) for s in seqs]))
            last = torch.tensor(list(itertools.accumulate(len(s) for s in seqs)), device=self.device) - 1
            logits = self.model.compute_logits(hidden[last]).float()  # [B, V]
            for row, i in enumerate(active):
                p = params[i]
                tok = self._sample(logits[row], p, gens[i])
                gen[i].append(tok)
                n = len(gen[i])
                if n >= p.min_tokens and not p.ignore_eos and tok in self.eos_token_ids:
                    finish[i], stop_reason[i] = "stop", None
                elif n >= p.min_tokens and tok in p.stop_token_ids:
                    finish[i], stop_reason[i] = "stop", tok
                elif p.max_tokens is not None and n >= p.max_tokens or len(seqs[row]) + 1 >= max_len:
                    finish[i] = "length"
                if finish[i] is None and p.stop:
                    text = self.tokenizer.decode(gen[i], skip_special_tokens=p.skip_special_tokens)
                    hit = next((s for s in p.stop if s in text), None)
                    if hit is not None:
                        finish[i], stop_reason[i] = "stop", hit
        outs = []
        for i, toks in enumerate(gen):
            p = params[i]
            text = self.tokenizer.decode(toks, skip_special_tokens=p.skip_special_tokens)
            if isinstance(stop_reason[i], str):
                cut = text.find(stop_reason[i])
                text = text[:cut + (len(stop_reason[i]) if p.include_stop_str_in_output else 0)]
            outs.append(CompletionOutput(index=0, text=text, token_ids=toks, finish_reason=finish[i],
                                         stop_reason=stop_reason[i]))
        return outs

    def _sample(self, logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
        """One token from logits [V]: greedy at temperature 0, else temperature / top-k / top-p sampling."""
        if p.is_greedy:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
