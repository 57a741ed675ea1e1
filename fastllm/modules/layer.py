"""The checkpoint function that runs a QLoRA decoder layer as one self-recomputing op (``ops.lora_layer``).

transformers' ``GradientCheckpointingLayer`` calls ``layer._gradient_checkpointing_func(partial(forward, layer,
**kwargs), hidden_states)`` in training; the patch registry sets that attribute to ``fused_layer_checkpoint``
(the ``fused_layer`` patch). Each call is checked: when the layer is what the fused op computes (a decoder layer
of the architecture table whose norms (Qwen3's q/k norms too), MLP and seven projections carry fastllm's rms_norm,
mlp and lora patches and take the fused path on this input, frozen biases only, SDPA or eager attention without
dropout, no KV cache, no hooks on the modules the op bypasses), the op runs; otherwise the call is checkpointed op
by op (``nonreentrant_checkpoint``), and the reason is counted in ``LAYER_CALLS`` (shown in ``patch_report(model)``)
and logged once as a warning.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter

import torch
from torch.nn.modules import module as _nn_module

from .._compat import pick_backend
from ..arch import arch_of_module
from ..ops.lora import frozen_parts
from ..ops.lora_layer import LayerParts, lora_decoder_layer
from .checkpointing import OFFLOADER, nonreentrant_checkpoint
from .decoder import attend_kwargs, attention_interface, needs_eager, qk_norms
from .lora import fused_parts, stacked_bias
from .mlp import fast_mlp_forward
from .rms_norm import fast_rms_norm_forward

__all__ = ["LAYER_CALLS", "fused_layer_checkpoint", "fused_layer_offload"]

logger = logging.getLogger("fastllm")
LAYER_CALLS: Counter = Counter()  # "fused", or the reason a call was checkpointed op by op -> calls
_LOGGED: set = set()
_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def _bound(module, fn) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is fn


def _norm_parts(norm) -> tuple:
    """(weight, eps, offset) of a norm carrying the rms_norm patch (its patch attribute: no table lookup per call)."""
    return (norm.weight, *norm.__dict__["_fastllm_rms"])


def _attend(attn, interface, mask, extra, q, k, v):
    """transformers' attention call (as ``decoder.attend_region`` makes it), without dropout."""
    return interface(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **extra)[0]


def _module_hooks(module) -> bool:
    """Hooks a module's ``__call__`` would run: its own or global ones."""
    m = _nn_module  # the module holding nn.Module's global hook dicts (read at call time: they may be rebound)
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)


def _layer_of(function):
    """The decoder layer of transformers' checkpoint call: ``partial(forward, layer, **kwargs)`` (transformers
    >= 5.2x checkpoints ``forward``: module hooks stay outside) or ``partial(super().__call__, **kwargs)``
    (5.1x checkpoints ``__call__``: the fused op may bypass it only when no hooks would run); or the reason."""
    if not isinstance(function, functools.partial):
        return "not transformers' checkpoint call of a decoder layer"
    if len(function.args) == 1:
        return function.args[0]
    layer = getattr(function.func, "__self__", None)
    if function.args or layer is None or getattr(function.func, "__func__", None) is not torch.nn.Module.__call__:
        return "not transformers' checkpoint call of a decoder layer"
    if _module_hooks(layer):
        return "module hooks on the decoder layer (its __call__ runs inside the checkpoint)"
    return layer


def _plan(function, args, kwargs):
    """The fused op's arguments for this checkpoint call, or the reason it cannot take it."""
    layer = _layer_of(function)
    if isinstance(layer, str):
        return layer
    if kwargs or len(args) != 1:
        return "not transformers' checkpoint call of a decoder layer"
    kw, x = function.keywords, args[0]
    mods = getattr(layer, "_modules", {})
    if not all(name in mods for name in _PARTS) or not isinstance(x, torch.Tensor) or x.dim() != 3:
        return "not a decoder layer of the architecture table"
    norm1, attn, norm2, mlp = (mods[name] for name in _PARTS)
    arch = arch_of_module(layer, "layer")
    if arch is None:
        return "not a decoder layer of the architecture table"
    sandwich = ()
    if arch.sandwich_norms:  # Gemma: post_attention_layernorm normalises attention's output; n2 is pre-feed-forward
        pre_ff, post_ff = mods.get("pre_feedforward_layernorm"), mods.get("post_feedforward_layernorm")
        if pre_ff is None or post_ff is None:
            return f"a {arch.model_type} decoder layer without its feed-forward norms"
        sandwich, norm2 = (norm2, post_ff), pre_ff
    if kw.get("cache", kw.get("past_key_values")) is not None:
        return "a KV cache"
    if kw.get("position_embeddings") is None:
        return "no position_embeddings"
    interface = attention_interface(attn)
    if interface is None or needs_eager(attn, kw):
        return "attention the fused op does not run (implementation or kwargs)"
    if attn.training and attn.attention_dropout:
        return "attention dropout"
    if getattr(getattr(attn.__dict__.get("forward"), "__func__", None), "_fastllm_compiled", None) != "attention":
        # the lora_attention patch checked this attention against its table entry (class, forward, submodules)
        return "an attention without fastllm's attention patch"
    head_norms = qk_norms(attn) or ()
    norms = (norm1, norm2, *sandwich, *head_norms)
    if not (all(_bound(n, fast_rms_norm_forward) for n in norms) and _bound(mlp, fast_mlp_forward)):
        return "norms or MLP without fastllm's patches"
    for norm in norms:
        w = norm._parameters.get("weight")
        if w is None or w.requires_grad or torch.result_type(x, w) != x.dtype:
            return "an RMSNorm weight that is trained or changes the dtype"
    a_mods, m_mods = attn._modules, mlp._modules
    projs = [a_mods.get(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projs += [m_mods.get(n) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None for p in projs):
        return "not a decoder layer of the architecture table"
    if any(_module_hooks(m) for m in (attn, mlp, *norms, *projs)):
        return "module hooks on modules the fused op bypasses"
    biases = ([], [])  # q/k/v's and o's frozen biases (Qwen2's q/k/v); the MLP's take its own op, which has none
    groups = [fused_parts(projs[:3], x, biases=biases[0]), fused_parts(projs[3:4], x, biases=biases[1]),
              fused_parts(projs[4:], x)]
    if any(g is None for g in groups):
        return "a projection outside the fused QLoRA path"
    nq, d = attn.config.num_attention_heads, attn.head_dim
    nkv = attn.config.num_key_value_heads
    if [p[0].quant_state.shape[0] for p in groups[0]] != [nq * d, nkv * d, nkv * d]:
        return "q/k/v widths do not match the heads"
    use_triton = pick_backend("auto", x.device) == "triton"
    frozen = [frozen_parts(g, names, "auto", use_triton) for g, names in
              zip(groups, (("q", "k", "v"), ("o",), ("gate", "up", "down")))]
    for i, b in enumerate(biases):
        frozen[i] = frozen[i]._replace(bias=stacked_bias(groups[i], b))
    cos, sin = kw["position_embeddings"]
    frozen[2] = frozen[2]._replace(gelu=mlp.__dict__["_fastllm_mlp"][0])
    parts = LayerParts(_norm_parts(norm1), _norm_parts(norm2), *frozen,
                       (nq, nkv, d),
                       functools.partial(_attend, attn, interface, kw.get("attention_mask"), attend_kwargs(attn)),
                       use_triton, tuple(map(_norm_parts, head_norms)) or None,
                       tuple(map(_norm_parts, sandwich)) or None)
    adapters = tuple(t for g in groups for (_, a, b, _) in g for t in (a, b))
    return x, cos, sin, parts, adapters


def fused_layer_checkpoint(function, *args, **kwargs):
    """A ``_gradient_checkpointing_func``: the fused decoder-layer op where it applies, else non-reentrant
    checkpointing of the layer's own forward."""
    plan = _plan(function, args, kwargs)
    if isinstance(plan, str):
        LAYER_CALLS[plan] += 1
        if plan not in _LOGGED:
            _LOGGED.add(plan)
            logger.warning("fastllm: a decoder layer is checkpointed op by op (fused_layer skipped): %s", plan)
        return nonreentrant_checkpoint(function, *args, **kwargs)
    LAYER_CALLS["fused"] += 1
    return lora_decoder_layer(*plan)


def fused_layer_offload(function, *args, **kwargs):
    """``fused_layer_checkpoint`` with the kept input parked in pinned host memory (``checkpointing.Offloader``)."""
    with OFFLOADER.hooks():
        return fused_layer_checkpoint(function, *args, **kwargs)
