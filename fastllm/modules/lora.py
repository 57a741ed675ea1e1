"""PEFT's ``lora.Linear4bit`` forward through ``fastllm.ops.lora_nf4_linear`` (one autograd Function), and the
multi-projection fusions built on it: a Llama MLP (``fused_lora_mlp``, called by the ``mlp`` patch's forward) and
attention's q/k/v (``fused_lora_qkv``, called by the ``lora_attention`` forward) as one op each, when every
projection involved carries this patch and takes the fused path.

Bound per instance by the patch registry. The fused path takes the common training case: one active
plain-LoRA adapter (no DoRA or other variant, no LoRA bias, no dropout), not merged, adapters enabled,
no per-call ``adapter_names``, eager (compiled regions trace PEFT's own forward, which inductor fuses),
and the LoRA branch in the base layer's compute dtype (autocast off or at that dtype). Anything else
runs PEFT's forward unchanged, so multiple adapters, ``disable_adapter()``, merging and mixed batches
keep working.
"""

from __future__ import annotations

import torch
from torch import nn

from .._compat import is_linear4bit
from ..ops.lora import lora_nf4_linear
from ..ops.lora_mlp import lora_mlp
from ..ops.lora_qkv import lora_qkv
from .nf4_linear import nf4_linear_eligible, prepare_nf4_call

__all__ = ["fused_lora_forward", "fused_lora_mlp", "fused_lora_qkv", "is_lora_linear4bit", "lora_eligible"]


def is_lora_linear4bit(module) -> bool:
    """A PEFT LoRA layer wrapping a bitsandbytes ``Linear4bit`` (``peft.tuners.lora.bnb.Linear4bit``)."""
    return (hasattr(module, "lora_A") and hasattr(module, "get_base_layer")
            and is_linear4bit(module.get_base_layer()))


def lora_eligible(module) -> str | None:
    """None when the fused path can serve ``module`` (per call it may still defer to PEFT), else why not."""
    if not is_lora_linear4bit(module):
        return "not a PEFT LoRA layer over a bitsandbytes Linear4bit"
    return nf4_linear_eligible(module.get_base_layer())


def _single_plain_adapter(layer) -> str | None:
    """The one active adapter when it is plain LoRA without dropout or bias, else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]  # PEFT skips the others too
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "use_dora", {}).get(name, False):
        return None
    if not isinstance(layer.lora_dropout[name], nn.Identity) or layer.lora_B[name].bias is not None:
        return None
    return name


def _fusable(layer, x: torch.Tensor):
    """(x in the compute dtype, input dtype, bias, adapter name) when the fused path serves ``layer(x)``,
    else None (PEFT's forward must run)."""
    name = None if torch.compiler.is_compiling() else _single_plain_adapter(layer)
    if name is None:
        return None
    prepared = prepare_nf4_call(layer.get_base_layer(), x)
    if prepared is None:
        return None
    xc, inp_dtype, bias = prepared
    if torch.is_autocast_enabled(xc.device.type) and torch.get_autocast_dtype(xc.device.type) != xc.dtype:
        return None  # PEFT would run the adapter in the autocast dtype
    return xc, inp_dtype, bias, name


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``lora.Linear4bit.forward`` replacement: ``base(x) + scaling * lora_B(lora_A(x))`` in one op."""
    fusable = None if (args or kwargs) else _fusable(self, x)
    if fusable is None:
        return type(self).forward(self, x, *args, **kwargs)
    xc, inp_dtype, bias, name = fusable
    A, B = self.lora_A[name].weight, self.lora_B[name].weight
    return lora_nf4_linear(xc, self.get_base_layer().weight, A, B, self.scaling[name], bias).to(inp_dtype)


def _patched(layer) -> bool:
    """``layer`` has the lora patch bound (so the user asked for the fused path on it)."""
    return getattr(layer.__dict__.get("forward"), "__func__", None) is fused_lora_forward


def _fused_parts(projs, x: torch.Tensor) -> list | None:
    """``(weight, A, B, scale)`` of each projection when all carry the lora patch and can take the fused path
    on ``x`` with no cast and no bias; None otherwise (then the caller runs them one by one, each still fused
    on its own where it can be)."""
    if not all(_patched(p) for p in projs):
        return None
    parts = []
    for p in projs:
        fusable = _fusable(p, x)
        if fusable is None or fusable[0].dtype != x.dtype or fusable[2] is not None:
            return None
        name = fusable[3]
        parts.append((p.get_base_layer().weight, p.lora_A[name].weight, p.lora_B[name].weight, p.scaling[name]))
    return parts


def fused_lora_mlp(mlp, x: torch.Tensor) -> torch.Tensor | None:
    """``down(silu(gate(x)) * up(x))`` as one op (a Llama MLP under QLoRA with the lora patch), or None.

    down_proj's input h has x's dtype, so checking its fused path against x serves all three."""
    parts = _fused_parts((mlp.gate_proj, mlp.up_proj, mlp.down_proj), x)
    return None if parts is None else lora_mlp(x, *parts)


def fused_lora_qkv(attn, x: torch.Tensor):
    """(q, k, v) projections of x as one op (Llama attention under QLoRA with the lora patch), or None."""
    parts = _fused_parts((attn.q_proj, attn.k_proj, attn.v_proj), x)
    return None if parts is None else lora_qkv(x, *parts)
