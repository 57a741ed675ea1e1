"""Replacement ``forward`` for transformers' SwiGLU MLPs of the table (``LlamaMLP``, ``Qwen2MLP``, ...; same
signature).

``down_proj(silu(gate_proj(x)) * up_proj(x))``: the three projections stay module calls, so PEFT
LoRA layers, bitsandbytes ``Linear4bit`` and the fastllm NF4 linear all still dispatch; only the
elementwise SwiGLU is fused. The exception: when the ``lora`` patch sits on all three projections and
each can take its fused path, the MLP is one op (``modules.lora.fused_lora_mlp``).
"""

from __future__ import annotations

import torch

from ..ops.swiglu import swiglu
from .lora import fused_lora_mlp

_SILU_NAMES = ("silu", "swish")


def fast_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The MLP's ``forward`` with a fused SwiGLU (bound per instance); with the ``lora`` patch on all three
    QLoRA projections, the whole MLP runs as one autograd op (``fastllm.ops.lora_mlp``)."""
    y = fused_lora_mlp(self, x)
    if y is not None:
        return y
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def mlp_eligible(module) -> str | None:
    """Why ``module`` cannot take the fused SwiGLU MLP, or None when it can."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not hasattr(module, name):
            return f"no {name}"
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    if act not in _SILU_NAMES:
        return f"activation {act!r} is not SiLU"
    return None
