"""Loads a Hugging Face model directory: config, memory-mapped safetensors into a model built on `meta`, tokenizer, generation defaults.

Each checkpoint tensor is read once from its mmap'd file and assigned to (or copied into a slice of) its target,
so peak memory stays close to the size of the weights.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from marserve import hugepages, progress
from marserve.config import ModelConfig
from marserve.errors import CheckpointError, ConfigError
from marserve.experts import offloaded
from marserve.experts.provider import ExpertProvider
from marserve.models import get_model_class

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: str = "cpu") -> torch.dtype:
    """"auto" = what runs the checkpoint correctly and fastest on `device` (auto_dtype; logged in one line),
    else one of DTYPES."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        chosen, why = auto_dtype(config.dtype, device)
        logger.info("dtype auto: %s (%s)", str(chosen).replace("torch.", ""), why)
        return chosen
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def auto_dtype(checkpoint_dtype: str, device: str = "cpu") -> tuple[torch.dtype, str]:
    """(dtype, why) for a checkpoint stored in `checkpoint_dtype` on `device`.

    Off the CPU: the checkpoint's dtype. On the CPU, bf16 stays bf16 where a fast bf16 path exists (the native
    kernels, which stream bf16 weights at half the bytes of fp32 on every ISA, or oneDNN's bf16 on AVX-512):
    decode reads every weight once per step, so it runs up to ~2x faster than fp32. Without either, torch's
    bf16 matmuls run several times slower than fp32, so fp32 is chosen; fp16 has no fast CPU path at all."""
    name = str(checkpoint_dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ConfigError(f"checkpoint dtype {checkpoint_dtype!r} is not supported; pass dtype= one of "
                          f"{', '.join(DTYPES)}")
    if not str(device).startswith("cpu"):
        return DTYPES[name], "the checkpoint's dtype"
    if name == "float32":
        return torch.float32, "the checkpoint's dtype"
    from marserve_kernels import cpu_features, cpu_linear
    if name == "bfloat16":
        isa = cpu_features.isa()
        if cpu_linear.native_available(torch.bfloat16):
            return torch.bfloat16, f"the checkpoint's dtype; native bf16 kernels for {isa}"
        if cpu_linear.onednn_runs(torch.bfloat16):
            return torch.bfloat16, "the checkpoint's dtype; oneDNN runs bf16 on this CPU"
        return torch.float32, f"bf16 checkpoint, but no fast bf16 path on this {isa} CPU (no native kernels)"
    return torch.float32, f"{name} checkpoint; the CPU has no fast {name} path"


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: model_dir / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: file not found (listed in {index.name})")
        return files
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(path: Path):
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def load_model(model_dir, dtype: str | torch.dtype = "auto", device: str = "cpu", expert_cache: float = 1.0,
               expert_cache_gb: float | None = None, expert_policy: str = "lru", prepare=None):
    """Build the architecture on `meta`, then fill every parameter and buffer from the checkpoint -> (model, config).

    With an expert budget below all experts (expert_cache < 1, or expert_cache_gb), each MoE block gets an
    offloading provider instead (marserve/experts/offloaded.py): expert tensors are not read here, only located,
    and the store streams them once afterwards (checksums, initial resident set).

    prepare(model), when given, runs on the meta model before any weight is read (expert parallelism swaps in
    providers that keep only this rank's experts: the others are never read)."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    torch_dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = get_model_class(config.model_type)(config)
        if prepare is not None:
            prepare(model)
    files = checkpoint_files(model_dir)
    offload = None
    if offloaded.asks_for_offload(expert_cache, expert_cache_gb):
        offload = offloaded.plan(model, config, model_dir, files, torch_dtype, expert_cache, expert_cache_gb,
                                 expert_policy, device)
    skipped = offload.tensor_names if offload is not None else set()
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers()))
    expected = {n: tuple(t.shape) for n, t in targets.items()}
    filled: dict[str, set] = {}  # target -> parts filled (None = whole, (expert, half) for slices)
    _read_tensors(model, config, model_dir, files, skipped, targets, expected, filled, torch_dtype, device)
    _check_complete(model, config, model_dir, expected, filled)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    if offload is not None:
        offload.start()
    return model, config


def _read_tensors(model, config, model_dir, files, skipped, targets, expected, filled, dtype, device) -> None:
    """Every checkpoint tensor but the `skipped` into its target, file by file. A function of its own so that
    the files' mappings are gone when it returns (an open mapping keeps its pages cached; see experts/offloaded.py)."""
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    # One bar over every tensor (only on a terminal; see marserve/progress.py): a large checkpoint reads for minutes.
    with progress.bar(total=len(files), desc=f"loading {model_dir.name}", unit="tensor") as shown:
        for path, names in by_file.items():
            with _open(path) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"{path}: tensor {name} listed in the index is not in the file")
                    if name in skipped:  # an offloaded expert: the store reads it by offset when needed
                        shown.update()
                        continue
                    _load_one(model, config, path, f, name, targets, expected, filled, dtype, device)
                    shown.update()


def _load_one(model, config, path, f, name, targets, expected, filled, dtype, device):
    target, expert, half = model.checkpoint_target(name)
    if target == "lm_head.weight" and config.tie_word_embeddings:
        return  # tied: the embedding is the head
    if target not in targets:
        raise CheckpointError(f"{path}: unexpected tensor {name} (no such weight in a {config.model_type} model"
                              + (" without MAR for this layer)" if ".mar." in name else ")"))
    try:
        shape = tuple(f.get_slice(name).get_shape())
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged entry
        raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None
    full = expected[target]
    want = full if expert is None else (full[1] // 2, full[2]) if half is not None else full[1:]
    if shape != tuple(want):
        raise CheckpointError(f"{path}: tensor {name} has shape {list(shape)}, expected {list(want)}")
    module_name, _, attr = target.rpartition(".")
    module = model.get_submodule(module_name)
    if expert is None:
        # MAR usage stays float32 (spec); everything else takes the model dtype.
        want_dtype = torch.float32 if target.endswith("mar_usage") else dtype
        nbytes = math.prod(shape) * torch.empty((), dtype=want_dtype).element_size()
        if torch.device(device).type == "cpu" and nbytes >= hugepages.HUGE_PAGE:
            tensor = hugepages.empty(shape, want_dtype)  # large weights: read straight onto huge pages
            _read_into(path, name, tensor)
        else:
            tensor = f.get_tensor(name).to(device=device, dtype=want_dtype)
        _assign(module, attr, tensor)
        filled.setdefault(target, set()).add(None)
        return
    slot = module.local_slot(expert) if isinstance(module, ExpertProvider) else expert
    if slot is None:
        return  # another rank's expert: never read
    current = getattr(module, attr)
    if current.is_meta:  # first slice of a stacked parameter: allocate it once
        _assign(module, attr, hugepages.empty(full, dtype=dtype, device=device))
        current = getattr(module, attr)
    rows = current.data[slot]
    if half is not None:
        I = full[1] // 2
        rows = rows[half * I:(half + 1) * I]
    _read_into(path, name, rows)
    filled.setdefault(target, set()).add((slot, half))


_headers: dict = {}


def _read_into(path: Path, name: str, dest: torch.Tensor) -> None:
    """Read one tensor straight from the file into `dest` (a slice of a stacked parameter).

    Copying out of an mmap would keep the touched file pages mapped next to the stacked copy (2x RSS);
    a plain read into the destination costs one copy and no extra resident memory.
    """
    from marserve.experts.checkpoint_index import ST_DTYPES, read_header
    key = str(path)
    if key not in _headers:
        _headers.clear()  # one file at a time: shards are visited in order
        _headers[key] = read_header(path)
    data_start, header = _headers[key]
    entry = header[name]
    begin, end = entry["data_offsets"]
    src_dtype = ST_DTYPES.get(entry["dtype"])
    if src_dtype is None:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
    direct = src_dtype == dest.dtype and dest.is_contiguous() and dest.device.type == "cpu"
    buf = dest if direct else torch.empty(dest.shape, dtype=src_dtype)
    view = memoryview(buf.view(torch.uint8).numpy()).cast("B")  # bytes of buf, written in place
    if view.nbytes != end - begin:
        raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes, expected {view.nbytes}")
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        if f.readinto(view) != view.nbytes:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (tensor {name} is cut short)")
    if not direct:
        dest.copy_(buf)


def _assign(module, attr: str, tensor: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def _check_complete(model, config, model_dir, expected, filled) -> None:
    for target, shape in expected.items():
        if target == "lm_head.weight" and config.tie_word_embeddings:
            continue
        parts = filled.get(target, set())
        if target.endswith("experts.w13"):
            need = {(e, h) for e in range(shape[0]) for h in (0, 1)}
        elif target.endswith("experts.w2"):
            need = {(e, None) for e in range(shape[0])}
        else:
            need = {None}
        if None in parts or need <= parts:
            continue
        name = _disk_name(config, target, need - parts)
        if ".mar." in name:  # the config promises memory the weights do not carry
            raise CheckpointError(f"{model_dir / 'config.json'}: its \"mar\" block covers this layer but tensor "
                                  f"{name} is missing from the safetensors files (expected shape {list(shape)})")
        raise CheckpointError(f"{model_dir}: tensor {name} is missing (expected shape {list(shape)})")


def _disk_name(config: ModelConfig, target: str, missing: set) -> str:
    """Our target name, spelt as a checkpoint would spell it, for error messages."""
    name = target.replace(".mar_memory", ".mar.memory").replace(".mar_usage", ".mar.usage")
    part = sorted(missing, key=repr)[0]
    if part is None or "experts." not in name:
        return name
    expert, half = part
    names = ("w1", "w3", "w2") if config.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    which = names[2] if half is None else names[half]
    return name.rsplit(".experts.", 1)[0] + f".experts.{expert}.{which}.weight"


def load_tokenizer(model_dir):
    """The checkpoint's fast tokenizer (chat template from tokenizer_config.json / chat_template.jinja)."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{model_dir / 'tokenizer.json'}: file not found")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad tokenizer
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({e})") from None
    if tok.chat_template is None:
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            tok.chat_template = json.loads(cfg_path.read_text()).get("chat_template")
    return tok


def generation_defaults(model_dir, config: ModelConfig | None = None) -> dict:
    """SamplingParams defaults from generation_config.json (temperature, top_p, top_k, max_tokens) + eos ids."""
    model_dir = Path(model_dir)
    path = model_dir / "generation_config.json"
    raw = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    out = {}
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0  # transformers' greedy default
    elif "temperature" in raw:
        out["temperature"] = float(raw["temperature"])
    if "top_p" in raw:
        out["top_p"] = float(raw["top_p"])
    if "top_k" in raw:
        out["top_k"] = int(raw["top_k"])
    if "max_new_tokens" in raw:
        out["max_tokens"] = int(raw["max_new_tokens"])
    if "repetition_penalty" in raw:
        out["repetition_penalty"] = float(raw["repetition_penalty"])
    eos = raw.get("eos_token_id", config.eos_token_id if config else None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    out["eos_token_ids"] = eos
    return out
