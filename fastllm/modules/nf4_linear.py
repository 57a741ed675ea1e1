"""Drop-in forward for ``bitsandbytes.nn.Linear4bit`` through ``fastllm.ops.nf4_linear``.

``nf4_linear4bit_forward(self, x)`` has the signature and semantics of ``Linear4bit.forward`` in
bitsandbytes 0.50: it casts ``x`` to ``compute_dtype`` (set from the first input, as bnb's
``set_compute_type`` does), casts the bias the same way, computes ``x @ W.T + b`` and returns the
result in the input's dtype. The patch registry binds it per instance (``types.MethodType``) on the
**base** Linear4bit that PEFT's ``base_layer(x)`` reaches, so LoRA adapters, ``disable_adapter()``
and merging are untouched. Nothing here mutates modules beyond what bnb's own forward does.
"""

from __future__ import annotations

import torch

from .._compat import SUPPORTED_DTYPES, bnb, is_linear4bit
from ..ops.nf4 import nf4_linear

__all__ = ["nf4_linear4bit_forward", "nf4_linear_eligible"]


def nf4_linear_eligible(module) -> str | None:
    """None when ``module`` can take ``nf4_linear4bit_forward``, else the reason it cannot."""
    if not is_linear4bit(module):
        return "not a bitsandbytes Linear4bit"
    qs = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    if qs is None:
        return "weight not quantized yet (no quant_state: move the module to its device first)"
    if qs.quant_type != "nf4":
        return f"quant_type {qs.quant_type!r} is not nf4"
    if getattr(qs, "packing_format_for_cpu", False):
        return "weight repacked for bitsandbytes' CPU inference kernel (AVX512-BF16 layout)"
    if qs.dtype not in SUPPORTED_DTYPES:
        return f"unsupported weight dtype {qs.dtype}"
    if module.compute_dtype is not None and module.compute_dtype not in SUPPORTED_DTYPES:
        return f"unsupported compute_dtype {module.compute_dtype}"
    if tuple(qs.shape) != (module.out_features, module.in_features):
        return f"quant_state.shape {tuple(qs.shape)} is not (out_features, in_features)"
    if qs.blocksize & (qs.blocksize - 1):
        return f"blocksize {qs.blocksize} is not a power of two"
    return None


def nf4_linear4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit.forward`` replacement: ``(x.to(compute_dtype) @ W.T + b).to(x.dtype)``.

    x: (..., in_features) -> (..., out_features).
    """
    b = bnb()
    b.nn.modules.fix_4bit_weight_quant_state_from_module(self)
    quant_state = self.weight.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):
        # Repacked by bnb's CPU inference path before we were bound: only bnb reads that layout.
        return b.nn.Linear4bit.forward(self, x)

    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True

    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)

    bias = self.bias
    if bias is not None:
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)  # bnb converts the stored bias once, in place
        if self.compute_dtype is not None:
            bias = bias.to(self.compute_dtype)

    return nf4_linear(x, self.weight, bias).to(inp_dtype)
