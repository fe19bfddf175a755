"""The CPU training loop: builds a small MoE, trains it with (or without) MAR, checkpoints and resumes."""

from __future__ import annotations

import glob
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from marserve.errors import ConfigError
from marserve.train.checkpoint import load_mar_state_into, save_mar_checkpoint
from marserve.train.data import DomainStreams
from marserve.train.mar_router import (SUPPORTED_MODEL_TYPES, MARSettings, install_mar, load_balancing_loss,
                                       update_memories)


@dataclass
class ModelShape:
    """A small MoE; the defaults train in ~25 min on one CPU thread and fit in < 32 MB as bf16."""

    model_type: str = "qwen3_moe"
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    expert_intermediate: int = 256
    max_position: int = 1024

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"--arch must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top-k {self.top_k} must be in [1, {self.num_experts}]")

    def hf_config(self, eos_id: int, pad_id: int):
        from transformers import AutoConfig
        common = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                      num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                      num_experts_per_tok=self.top_k, max_position_embeddings=self.max_position,
                      intermediate_size=self.expert_intermediate, tie_word_embeddings=True,
                      eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, rope_theta=10000.0)
        if self.model_type == "mixtral":
            extra = dict(num_local_experts=self.num_experts, router_jitter_noise=0.0)
        else:
            extra = dict(num_experts=self.num_experts, norm_topk_prob=True)
            if self.model_type in ("qwen3_moe", "qwen2_moe"):
                extra.update(moe_intermediate_size=self.expert_intermediate, decoder_sparse_step=1,
                             mlp_only_layers=[])
            if self.model_type == "qwen3_moe":
                extra["head_dim"] = self.hidden_size // self.num_heads
            if self.model_type == "qwen2_moe":
                extra["shared_expert_intermediate_size"] = self.expert_intermediate
        return AutoConfig.for_model(self.model_type, **common, **extra)


@dataclass
class TrainConfig:
    corpus_dir: str
    out_dir: str
    tokenizer_dir: str
    shape: ModelShape = field(default_factory=ModelShape)
    mar: MARSettings = field(default_factory=MARSettings)
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    aux_loss_coef: float = 0.01
    seed: int = 0
    save_every: int = 100
    threads: int = 1
    save_dtype: str = "bfloat16"
    progress: bool = True
    stability_every: int = 50     # probe routing this often to log how stable it is over training (0 = never)
    stop_at: int | None = None   # leave the loop after this step (as an interruption would); resume finishes

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ConfigError("steps and batch size must be >= 1 and seq_len >= 8")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--save-dtype must be float32, bfloat16 or float16, got {self.save_dtype}")


def build_model(shape: ModelShape, mar: MARSettings, seed: int, eos_id: int, pad_id: int):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = shape.hf_config(eos_id, pad_id)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    routers = install_mar(model, mar, seed)
    return model, routers


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _state_path(out_dir: str) -> str:
    return os.path.join(out_dir, "trainer_state.pt")


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) training; writes the checkpoint into cfg.out_dir; returns a summary dict."""
    from tokenizers import Tokenizer
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    tok = Tokenizer.from_file(os.path.join(cfg.tokenizer_dir, "tokenizer.json"))
    if tok.get_vocab_size() > cfg.shape.vocab_size:
        raise ConfigError(f"tokenizer has {tok.get_vocab_size()} tokens but --vocab-size is {cfg.shape.vocab_size}")
    eos_id, pad_id = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    data = DomainStreams(tok, cfg.corpus_dir)
    model, routers = build_model(cfg.shape, cfg.mar, cfg.seed, eos_id, pad_id)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start, log = 0, []
    if os.path.exists(_state_path(cfg.out_dir)):
        st = torch.load(_state_path(cfg.out_dir), weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start, log = st["step"], st["log"]
    os.makedirs(cfg.out_dir, exist_ok=True)
    for r in routers:
        r.record = True
    model.train()
    # A fixed probe batch from the data (seed-independent step index) whose routing is re-measured every
    # stability_every steps: the share of (token, layer) top-k sets unchanged since the last probe.
    probe, _ = data.batch(10**9, 5, min(cfg.seq_len, 128), cfg.seed)
    prev_probe = _probe_routing(model, routers, probe) if start == 0 else None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress,
               desc="mar" if cfg.mar.enabled else "no-mar", dynamic_ncols=True)
    t0, tokens = time.time(), 0
    for step in bar:
        if cfg.stop_at is not None and step >= cfg.stop_at:
            bar.close()
            return {"steps": step, "stopped": True}
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        batch, _ = data.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed)
        out = model(input_ids=batch[:, :-1])
        lm = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                                               batch[:, 1:].reshape(-1))
        aux = load_balancing_loss(routers)
        loss = lm + cfg.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_memories(routers, cfg.mar)   # after the optimiser step, as the spec says
        tokens += batch[:, :-1].numel()
        entry = {"step": step + 1, "loss": round(lm.item(), 4), "aux": round(aux.item(), 4),
                 "load_cv": round(_load_cv(routers), 4)}
        if cfg.stability_every and (step + 1) % cfg.stability_every == 0:
            cur = _probe_routing(model, routers, probe)
            if prev_probe is not None:
                entry["routing_stability"] = round(float((cur == prev_probe).all(-1).float().mean()), 4)
            prev_probe = cur
        log.append(entry)
        bar.set_postfix(loss=f"{lm.item():.3f}", aux=f"{aux.item():.3f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1, "log": log,
                        "config": asdict(cfg)}, _state_path(cfg.out_dir) + ".tmp")
            os.replace(_state_path(cfg.out_dir) + ".tmp", _state_path(cfg.out_dir))
    elapsed = time.time() - t0
    for r in routers:
        r.record, r.last = False, None
    save_mar_checkpoint(model, cfg.out_dir, cfg.mar, getattr(torch, cfg.save_dtype), cfg.tokenizer_dir)
    _write_generation_config(cfg.out_dir, eos_id, pad_id)
    tail = [e["loss"] for e in log[-20:]]
    summary = {"steps": cfg.steps, "final_loss": sum(tail) / max(1, len(tail)), "seconds_this_run": round(elapsed, 1),
               "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1), "mar": cfg.mar.enabled}
    with open(os.path.join(cfg.out_dir, "train_log.json"), "w") as f:
        json.dump({"summary": summary, "config": asdict(cfg), "log": log}, f)
    return summary


@torch.no_grad()
def _probe_routing(model, routers, probe: torch.Tensor) -> torch.Tensor:
    """Sorted top-k ids [L, T, K] of every MoE layer on the probe batch (the memory is not updated)."""
    model(input_ids=probe[:, :-1])
    return torch.stack([r.last[2].sort(dim=-1).values for r in routers])


def _load_cv(routers) -> float:
    """Mean over layers of the coefficient of variation of this batch's per-expert load."""
    cvs = []
    for r in routers:
        counts = torch.bincount(r.last[2].flatten(), minlength=r.num_experts).float()
        cvs.append((counts.std(unbiased=False) / counts.mean()).item())
    return sum(cvs) / len(cvs)


def _write_generation_config(out_dir: str, eos_id: int, pad_id: int) -> None:
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [eos_id, pad_id], "pad_token_id": pad_id, "do_sample": True,
                   "temperature": 0.8, "top_p": 0.95}, f, indent=2)


def load_trained(model_dir: str, mar_enabled: bool | None = None):
    """Loads a checkpoint directory with transformers, installs MAR routing from its "mar" block (analysis, tests)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()       # the MAR tensors are "unexpected" to transformers, by design
    hf_logging.disable_progress_bar()
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    mar_cfg = cfg.get("mar")
    enabled = mar_cfg is not None if mar_enabled is None else mar_enabled
    settings = MARSettings(enabled=enabled, memory_slots=(mar_cfg or {}).get("memory_slots", 1),
                           affinity_scale=(mar_cfg or {}).get("affinity_scale", 0.0))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    routers = install_mar(model, settings)
    if enabled:
        load_mar_state_into(model, model_dir)
    model.eval()
    return model, routers


def existing_checkpoints(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "*.safetensors")))
