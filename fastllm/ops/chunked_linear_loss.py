"""Any per-token function of the logits, chunked: ``fn((h @ W.T + b).float(), y)`` without the logits.

``chunked_linear_loss`` (focal loss, distillation terms, ...) and ``linear_log_probs`` (RL policy
log-probabilities and entropy) share one autograd Function, ``_ChunkedLinearMap``:

- forward: per row chunk, ``logits = h_c @ W.T (+ b)`` in the matmul dtype, upcast to fp32,
  ``out_c = fn(logits_fp32, y_c)``; only ``out [N, ...]`` is kept.
- backward: **recompute** each chunk's logits, run autograd through ``fn`` alone to get
  ``g = d out_c / d logits_c`` (no hand-written gradient for any loss), then the linear layer's
  ``grad_h_c = g @ W``, ``grad_W += g.T @ h_c``, ``grad_b += g.sum(0)``.

At most one chunk of logits (plus ``fn``'s own autograd intermediates for that chunk) is alive at a
time; the price is one extra logits matmul per chunk. ``fn`` must be a pure function of its inputs:
parameters captured in a closure get no gradient through this op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .linear_cross_entropy import autocast_inputs, flatten_rows, resolve_chunk, row_chunks

PerTokenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _logits(h_c: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(b, h_c, W.t()) if b is not None else h_c @ W.t()


class _ChunkedLinearMap(torch.autograd.Function):
    """``out[i] = fn(float(h[i] @ W.T + b), y[i])`` for ``h [N, H]``, ``y [N]``; out ``[N]`` or ``[N, k]``."""

    @staticmethod
    def forward(ctx, h, W, b, y, fn, chunk):
        outs = [fn(_logits(h[s:e], W, b).float(), y[s:e]) for s, e in row_chunks(h.shape[0], chunk)]
        ctx.save_for_backward(h, W, b, y)
        ctx.fn, ctx.chunk = fn, chunk
        return torch.cat(outs) if outs else h.new_zeros(0, dtype=torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        h, W, b, y = ctx.saved_tensors
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_W = torch.zeros_like(W) if need_W else None
        grad_b = torch.zeros(W.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        for s, e in row_chunks(h.shape[0], ctx.chunk):
            h_c = h[s:e]
            with torch.enable_grad():
                z = _logits(h_c, W, b).float().requires_grad_(True)  # fp32 upcast inside the chunk
                out = ctx.fn(z, y[s:e])
                (g,) = torch.autograd.grad(out, z, grad_outputs=grad_out[s:e])
            del z, out
            g_lin = g.to(h.dtype)
            if grad_h is not None:
                torch.mm(g_lin, W, out=grad_h[s:e])
            if grad_W is not None:
                grad_W.addmm_(g_lin.t(), h_c)
            if grad_b is not None:
                grad_b += g.sum(0)
            del g, g_lin
        if grad_b is not None:
            grad_b = grad_b.to(b.dtype)
        return grad_h, grad_W, grad_b, None, None, None


def chunked_linear_map(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, fn: PerTokenFn, *,
                       bias: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """``fn((hidden @ weight.T + bias).float() [n, V], labels [n]) -> [n] or [n, k]`` over all tokens,
    chunked; returns ``labels.shape`` (+ ``(k,)``) fp32 with gradients for hidden/weight/bias."""
    h, y = flatten_rows(hidden, labels)
    chunk = resolve_chunk(chunk_size, h, weight)
    h, weight, bias = autocast_inputs(h, weight, bias)
    with torch.autocast(h.device.type, enabled=False):
        out = _ChunkedLinearMap.apply(h.contiguous(), weight, bias, y.contiguous(), fn, chunk)
    return out.reshape(*labels.shape, *out.shape[1:])


def chunked_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        loss_fn: PerTokenFn, *,
                        bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                        num_items_in_batch: int | torch.Tensor | None = None,
                        chunk_size: int | None = None) -> torch.Tensor:
    """Reduce ``loss_fn(logits_fp32 [n, V], labels [n]) -> [n]`` over the non-ignored tokens.

    ``loss_fn`` sees ignored labels replaced by 0 (so gathers stay in range) and its value there is
    masked out. "mean" divides by the count of non-ignored tokens (none -> loss 0 with zero grads),
    "sum" sums, "none" returns ``labels.shape`` (0 at ignored tokens); ``num_items_in_batch``
    divides the sum by that count (transformers' gradient-accumulation convention).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    per_token = chunked_linear_map(hidden, weight, safe, loss_fn, bias=bias, chunk_size=chunk_size)
    if per_token.shape != labels.shape:
        raise ValueError(f"loss_fn must return one loss per token, got shape {tuple(per_token.shape)} for "
                         f"labels {tuple(labels.shape)}")
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device)
        return total / denom.clamp_min(1)
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1)


def log_prob_entropy(z: torch.Tensor, ids: torch.Tensor, entropy: bool):
    """(log p[ids], entropy or None, logsumexp) of logits ``z`` (n, V) fp32 at ``ids`` (n,), with gradients."""
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1) if entropy else None  # H = lse - sum_j p_j z_j
    return logp, ent, lse


def _log_prob_fn(temperature: float, entropy: bool) -> PerTokenFn:
    def fn(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if temperature != 1.0:
            z = z / temperature
        logp, ent, _ = log_prob_entropy(z, ids, entropy)
        return logp if ent is None else torch.stack([logp, ent], dim=-1)

    return fn


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, *,
                     temperature: float = 1.0, chunk_size: int | None = None, return_entropy: bool = False,
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(hidden @ weight.T / temperature).gather(-1, token_ids)`` without the logits.

    ``hidden [..., H]``, ``token_ids [...]`` -> fp32 ``[...]`` log-probabilities (what GRPO/PPO need
    for policy and reference), with gradients; with ``return_entropy`` also the per-token entropy
    ``-sum_j p_j log p_j`` of the tempered distribution, as a second ``[...]`` tensor.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    out = chunked_linear_map(hidden, weight, token_ids, _log_prob_fn(float(temperature), return_entropy),
                             chunk_size=chunk_size)
    if return_entropy:
        return out[..., 0], out[..., 1]
    return out
