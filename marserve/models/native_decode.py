"""CPU decode in native calls: hands the layers' own weights to marserve_kernels.cpu_decode_layer_native.

Two forms. When every layer is an MoE layer whose ExpertProvider keeps all experts resident (and nobody
observes the routing), the whole stack of layers runs in one call per pass (`stack_for`, `run_stack`):
attention, routing and experts, layer after layer, with the routing decisions reported to each provider
afterwards. Otherwise each layer makes one call for everything from its input norm to the routing decision
(`layer_kernel`, `run_layer`) and then fetches its experts through its provider and runs them as before.

Applies to passes where every sequence decodes one token, on CPU, over the paged cache, without autograd,
for fp32 and bf16 models whose layers have their q/k/v fused into one plain projection (what the engine's
`pack_for_cpu` leaves when the native kernels are available). Anything else keeps the module-by-module path,
which stays the definition; MARSERVE_NATIVE_LAYER=0 turns this path off. The kernels keep the weight
tensors they were built from (on the layer and the model, at the first decode pass): weights are not to be
replaced after that (the engine prepares them once, with pack_for_cpu, before serving).
"""

from __future__ import annotations

import torch

from marserve.attention import AttentionMetadata, forced_backend
from marserve_kernels import cpu_decode_layer_native as kernel
from marserve_kernels import cpu_moe

_UNSUPPORTED = object()  # cached on a layer the kernel cannot take


def pass_applies(x: torch.Tensor, meta: AttentionMetadata) -> bool:
    """Whether this forward pass can take the native decode layers; decided once per pass (kept on meta)."""
    ok = meta.__dict__.get("_native_layer_ok")
    if ok is None:
        ok = (meta.is_paged and x.device.type == "cpu" and forced_backend() in (None, "native")
              and x.dtype in kernel.VARIANTS and all(n == 1 for n in meta.query_lens)
              and not (torch.is_grad_enabled() and x.requires_grad)
              and meta.kv_caches[0][0].dtype == x.dtype and kernel.available(x.dtype))
        meta.__dict__["_native_layer_ok"] = ok
    return ok


def layer_kernel(layer, dtype: torch.dtype) -> kernel.DecodeLayer | None:
    """The layer's native kernel (built on first ask and kept on the layer), or None when it cannot take it."""
    found = layer.__dict__.get("_native_decode")
    if found is None:
        weights = _layer_weights(layer)
        found = kernel.DecodeLayer(weights, dtype) if weights is not None and kernel.supports(weights, dtype) \
            else _UNSUPPORTED
        layer.__dict__["_native_decode"] = found
    return None if found is _UNSUPPORTED else found


def stack_for(model, dtype: torch.dtype, num_seqs: int) -> kernel.DecodeStack | None:
    """The whole-stack kernel of a model (built on first ask and kept on it), or None when some layer does not
    qualify (a dense or shared-expert layer, experts not all resident, a layer the kernel cannot take), a
    routing observer is set, or the pass is so large that per-expert GEMMs beat the native experts (then the
    per-layer form hands the experts to marserve_kernels.moe, which picks the GEMMs)."""
    found = model.__dict__.get("_native_stack")
    if found is None:
        found = _UNSUPPORTED
        layers = []
        for layer in model.model.layers:
            weights = _layer_weights(layer, with_experts=True)
            if weights is None or weights.w13 is None or not kernel.supports(weights, dtype):
                break
            layers.append(kernel.DecodeLayer(weights, dtype))
        else:
            if len({(k.E, k.K) for k in layers}) == 1:
                found = kernel.DecodeStack(layers)
                found.blocks = model.moe_blocks()  # whose providers get the routing decisions reported
        model.__dict__["_native_stack"] = found
    if found is _UNSUPPORTED or any(block.routing_observer is not None for block in found.blocks):
        return None
    first = found.layers[0]
    if not cpu_moe.native_is_faster(num_seqs, first.K, first.E, first.hidden, first.I, dtype):
        return None
    return found


def run_stack(model, stack: kernel.DecodeStack, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer of the pass in one call -> (the last MoE output, the residual stream before it)."""
    p = stack.new_pass(cos, sin, meta.block_tables, [n + 1 for n in meta.context_lens], meta.slot_mapping,
                       meta.kv_caches[0][0].shape[1])
    out, residual, (z, weights, ids) = stack.run(p, x, meta.kv_caches)
    per_layer = ids[0].numel()
    for block in stack.blocks:
        block.experts.record_lookups(per_layer)
    return out, residual


def _layer_weights(layer, with_experts: bool = False) -> kernel.LayerWeights | None:
    from marserve.models.layers import DenseMLP
    from marserve.models.moe import SparseMoeBlock
    attn, block = layer.self_attn, getattr(layer, layer.moe_name)
    if not hasattr(attn, "qkv_proj") or type(block) not in (SparseMoeBlock, DenseMLP):
        return None
    moe = type(block) is SparseMoeBlock
    experts = block.experts.resident() if with_experts and moe and block.shared_expert is None else None
    return kernel.LayerWeights(
        ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
        eps=layer.input_layernorm.eps, qkv=attn.qkv_proj.weight, o=attn.o_proj.weight, num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, scale=attn.scale, qkv_bias=attn.qkv_proj.bias,
        qk_norm=attn.qk_norm, q_norm=attn.q_norm.weight if attn.qk_norm else None,
        k_norm=attn.k_norm.weight if attn.qk_norm else None, qk_eps=attn.q_norm.eps if attn.qk_norm else 1e-6,
        clip=attn.clip_qkv, gate=block.gate.weight if moe else None, top_k=block.top_k if moe else 0,
        renormalise=block.renormalise if moe else False,
        mar_memory=block.mar_memory if moe and block.has_mar else None,
        mar_scale=block.affinity_scale if moe else 0.0, w13=experts[0] if experts else None,
        w2=experts[1] if experts else None)


def run_layer(layer, k: kernel.DecodeLayer, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
              sin: torch.Tensor, meta: AttentionMetadata):
    """The layer's decode step: native attention half, then its MoE block (experts via the provider) or MLP."""
    p = meta.__dict__.get("_native_layer_pass")
    if p is None:  # the same for every layer of the pass
        p = meta.__dict__["_native_layer_pass"] = k.new_pass(
            cos, sin, meta.block_tables, [n + 1 for n in meta.context_lens], meta.slot_mapping,
            meta.kv_caches[0][0].shape[1])
    k_cache, v_cache = meta.kv_caches[layer.self_attn.layer_idx]
    h, residual, routing = k.run(p, x, residual, k_cache, v_cache)
    block = getattr(layer, layer.moe_name)
    if routing is None:
        return block(h), residual
    z, weights, ids = routing
    return block.forward_routed(h, z, weights, ids), residual
