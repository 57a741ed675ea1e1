"""PEFT's ``lora.Linear4bit`` forward through ``fastllm.ops.lora_nf4_linear`` (one autograd Function).

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
from .nf4_linear import nf4_linear_eligible, prepare_nf4_call

__all__ = ["fused_lora_forward", "is_lora_linear4bit", "lora_eligible"]


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


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``lora.Linear4bit.forward`` replacement: ``base(x) + scaling * lora_B(lora_A(x))`` in one op."""
    name = None if (args or kwargs or torch.compiler.is_compiling()) else _single_plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    prepared = prepare_nf4_call(base, x)
    if prepared is None:
        return type(self).forward(self, x)
    xc, inp_dtype, bias = prepared
    if torch.is_autocast_enabled(xc.device.type) and torch.get_autocast_dtype(xc.device.type) != xc.dtype:
        return type(self).forward(self, x)  # PEFT would run the adapter in the autocast dtype
    A, B = self.lora_A[name].weight, self.lora_B[name].weight
    return lora_nf4_linear(xc, base.weight, A, B, self.scaling[name], bias).to(inp_dtype)
