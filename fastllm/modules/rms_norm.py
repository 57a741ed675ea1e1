"""Replacement ``forward`` for transformers' RMSNorms of the table (``LlamaRMSNorm``, ``Qwen3RMSNorm``, ...:
``weight * x * rsqrt(mean(x^2) + eps)``; ``Gemma3RMSNorm``: ``(1 + weight) * ...``; same signature)."""

from __future__ import annotations

import torch

from ..ops.rms_norm import rms_norm


def fast_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The RMSNorm's ``forward`` through fastllm's fused op (bound per instance, with ``rms_norm_attrs``)."""
    eps, offset = self.__dict__["_fastllm_rms"]
    return rms_norm(hidden_states, self.weight, eps, offset=offset)


def norm_args(module) -> tuple:
    """(eps, offset) of an RMSNorm of the table: its epsilon (``variance_epsilon``, Gemma's ``eps``) and its
    architecture's ``norm_offset`` (0: ``x * w``, 1: Gemma's ``x * (1 + w)``)."""
    from ..arch import arch_of_module

    eps = module.__dict__.get("variance_epsilon", module.__dict__.get("eps"))
    arch = arch_of_module(module, "rms_norm")
    return eps, (arch.norm_offset if arch is not None else 0.0)


def rms_norm_attrs(module) -> dict:
    """What the patched forward reads, set with it (and reverted with it)."""
    return {"_fastllm_rms": norm_args(module)}


def rms_norm_eligible(module) -> str | None:
    """Why ``module`` cannot take the fused RMSNorm, or None when it can."""
    if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() != 1:
        return "no 1-D weight"
    if not isinstance(norm_args(module)[0], float):
        return "no float variance_epsilon / eps"
    return None
