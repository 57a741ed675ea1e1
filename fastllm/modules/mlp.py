"""Replacement ``forward`` for transformers' SwiGLU MLPs of the table (``LlamaMLP``, ``Qwen2MLP``, ...; same
signature).

``down_proj(silu(gate_proj(x)) * up_proj(x))``: the three projections stay module calls, so PEFT
LoRA layers, bitsandbytes ``Linear4bit`` and the fastllm NF4 linear all still dispatch; only the
elementwise SwiGLU is fused. The exception: when the ``lora`` patch sits on all three projections and
each can take its fused path, the MLP is one op (``modules.lora.fused_lora_mlp``).
"""

from __future__ import annotations

import torch

from ..ops.swiglu import geglu, swiglu
from .lora import fused_lora_mlp

_ACT_NAMES = {"silu": ("silu", "swish"), "gelu_tanh": ("gelu_pytorch_tanh",)}  # Arch.activation -> config names


def fast_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The MLP's ``forward`` with a fused SwiGLU / GeGLU (bound per instance); with the ``lora`` patch on all three
    QLoRA projections, the whole MLP runs as one autograd op (``fastllm.ops.lora_mlp``)."""
    gelu, output_to_residual = self.__dict__["_fastllm_mlp"]
    y = fused_lora_mlp(self, x, gelu, output_to_residual)
    if y is not None:
        return y
    return self.down_proj((geglu if gelu else swiglu)(self.gate_proj(x), self.up_proj(x)))


def _activation(module) -> tuple[str | None, str | None]:
    """(the table's activation for this MLP's architecture, the config's activation name)."""
    from ..arch import arch_of_module

    arch = arch_of_module(module, "mlp")
    config = getattr(module, "config", None)
    # Gemma's configs name it hidden_activation, the others hidden_act
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return (arch.activation if arch is not None else "silu"), name


def mlp_attrs(module) -> dict:
    """What the patched forward reads: (GeGLU?, does the MLP's output only feed the residual add?). The second is
    False for Gemma, whose output goes through a norm first: a checkpoint's recompute must produce it."""
    from ..arch import arch_of_module

    arch = arch_of_module(module, "mlp")
    return {"_fastllm_mlp": (_activation(module)[0] == "gelu_tanh", not (arch is not None and arch.sandwich_norms))}


def mlp_eligible(module) -> str | None:
    """Why ``module`` cannot take the fused gated MLP, or None when it can."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not hasattr(module, name):
            return f"no {name}"
    want, act = _activation(module)
    if act not in _ACT_NAMES[want]:
        return f"activation {act!r} is not the {want} its architecture's entry names"
    return None
