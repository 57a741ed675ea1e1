"""Per-token losses of fp32 logits, pluggable into ``chunked_linear_loss`` and the CausalLM patch.

A per-token loss is any ``fn(logits_fp32 [n, V], labels [n]) -> [n]``; ``chunked_linear_loss``
takes its gradient by autograd, one chunk at a time. ``get_loss`` resolves a name or callable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PerTokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """``-log softmax(logits)[y]`` per token, 0 where ``labels == ignore_index``."""
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, *, gamma: float = 2.0, alpha: float | None = None,
               ignore_index: int = -100) -> torch.Tensor:
    """Focal loss per token (Lin et al. 2017): ``-alpha * (1 - p_y)**gamma * log p_y``.

    ``logits [n, V]`` (fp32), ``labels [n]`` -> ``[n]``; 0 where ``labels == ignore_index``.
    ``gamma = 0`` and ``alpha = None`` give cross-entropy. Down-weights tokens the model already
    predicts well, so training effort goes to the hard ones.
    """
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    # (1 - p)**gamma via -expm1(logp): exact near p -> 1, where 1 - exp(logp) cancels.
    loss = -(-torch.expm1(logp)).clamp_min(0).pow(gamma) * logp
    if alpha is not None:
        loss = alpha * loss
    return torch.where(valid, loss, torch.zeros_like(loss))


LOSSES: dict[str, PerTokenLoss] = {"cross_entropy": cross_entropy, "focal": focal_loss}


def get_loss(loss: str | PerTokenLoss) -> PerTokenLoss:
    """The per-token loss for a name in ``LOSSES`` or a callable (returned as is)."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known losses: {', '.join(LOSSES)} (or pass a callable)")
    return LOSSES[loss]
