"""Replacement ``forward`` for transformers' RMSNorms of the table (``LlamaRMSNorm``, ``Qwen3RMSNorm``, ...: all
``weight * x * rsqrt(mean(x^2) + eps)``; same signature)."""

from __future__ import annotations

import torch

from ..ops.rms_norm import rms_norm


def fast_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The RMSNorm's ``forward`` through fastllm's fused op (bound per instance)."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def rms_norm_eligible(module) -> str | None:
    """Why ``module`` cannot take the fused RMSNorm, or None when it can."""
    if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() != 1:
        return "no 1-D weight"
    if not isinstance(getattr(module, "variance_epsilon", None), float):
        return "no float variance_epsilon"
    return None
