"""lm_head projection + cross-entropy without materialising the ``[tokens, vocab]`` logits.

``linear_cross_entropy(h, W, y)`` equals ``F.cross_entropy((h @ W.T + b).float(), y)`` (with label
smoothing, z-loss ``zl * lse**2``, softcap ``c * tanh(x / c)``, ``ignore_index``) in value and in the
gradients of ``h``, ``W`` and ``b``. Tokens are processed in row chunks; at most one chunk of logits
``[chunk, V]`` is alive at a time.

Gradient strategy (the Liger FLCE trade-off): for ``reduction="mean"/"sum"`` the gradients are
**accumulated in forward**, chunk by chunk: logits chunk -> fused kernel writes ``dL/dlogits`` over
it -> ``grad_h[rows] = g @ W`` and ``grad_W += g.T @ h[rows]``. Backward only scales them by
``grad_output / denominator``. This costs three matmuls (the minimum) and no recompute. For
``reduction="none"`` the per-row upstream gradient is unknown in forward, so backward **recomputes**
each chunk's logits (four matmuls).

Backends: ``"triton"`` uses the closed-form kernel of ``fastllm.kernels.cross_entropy`` over the
chunk (logits stay in the matmul dtype and are upcast to fp32 in registers); ``"torch"`` upcasts
each chunk to fp32 and takes the gradient by autograd through ``F.cross_entropy`` (no hand-written
gradient). ``"auto"`` picks Triton on CUDA.

All labels ignored: the loss is 0 (not NaN as ``F.cross_entropy`` gives) and every gradient is an
exact, finite zero. ``num_items_in_batch`` follows transformers' gradient-accumulation rule: the sum
of token losses divided by that count (reduction is then "sum"-then-divide).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .._compat import cuda_allocatable, pick_backend

logger = logging.getLogger(__name__)

_REDUCTIONS = ("mean", "sum", "none")


def auto_chunk_size(n_tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: a logits chunk about as large as the hidden input (``n * H`` elements), at
    least 64 rows (narrower matmuls re-read ``W`` for too little work), a power of two, and within
    1/8 of the memory a new allocation can get (``cuda_allocatable``: within the process's cap)."""
    rows = max(64, (n_tokens * hidden) // max(vocab, 1))
    rows = 1 << (rows.bit_length() - 1)  # round down to a power of two
    if device.type == "cuda":
        per_row = vocab * torch.finfo(dtype).bits // 8
        rows = min(rows, max(16, cuda_allocatable(device) // 8 // per_row))
    return int(max(1, min(rows, max(n_tokens, 1))))


def _ce_per_token(z: torch.Tensor, y: torch.Tensor, ignore_index: int, label_smoothing: float,
                  z_loss: float, logit_softcap: float | None) -> torch.Tensor:
    """Per-token loss of fp32 logits ``z`` ``[n, V]`` (0 where ``y == ignore_index``), by torch ops."""
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    loss = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(z, dim=-1)
        loss = loss + z_loss * lse.square() * (y != ignore_index)
    return loss


def _chunk_loss_grad(backend: str, logits: torch.Tensor, y: torch.Tensor, opts: dict, want_grad: bool,
                     row_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss ``[n]`` (fp32) of one logits chunk and, if ``want_grad``, ``row_scale * dL/dlogits`` in
    the logits dtype (the Triton path returns ``logits`` itself, overwritten)."""
    if backend == "triton":
        from ..kernels.cross_entropy import cross_entropy_chunk

        loss, _ = cross_entropy_chunk(logits, y, compute_grad=want_grad, row_scale=row_scale, **opts)
        return loss, (logits if want_grad else None)
    if not want_grad:
        return _ce_per_token(logits.float(), y, **opts), None
    with torch.enable_grad():
        z = logits.float().requires_grad_(True)  # the fp32 upcast, inside the chunk
        loss = _ce_per_token(z, y, **opts)
        upstream = row_scale if row_scale is not None else torch.ones_like(loss)
        (g,) = torch.autograd.grad(loss, z, grad_outputs=upstream)
    return loss.detach(), g.to(logits.dtype)


def row_chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def _linear_ce_pass(h, W, b, y, opts, backend, chunk, needs, row_scale=None):
    """One sweep over the row chunks. ``needs = (grad_h, grad_W, grad_b)`` booleans.

    Returns ``(loss [N] fp32, grad_h, grad_W, grad_b)``, each grad unscaled (``row_scale`` aside)
    or None when not needed.
    """
    N = h.shape[0]
    want_grad = any(needs)
    loss = torch.empty(N, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if needs[0] else None
    # grad_W is written by the first chunk's mm (no zero-fill pass over the [V, H] buffer).
    grad_W = torch.empty_like(W) if needs[1] else None
    grad_b = None
    if needs[2] and b is not None:
        grad_b = torch.zeros(W.shape[0], dtype=torch.float32, device=h.device)
    for start, end in row_chunks(N, chunk):
        h_c = h[start:end]
        logits = torch.addmm(b, h_c, W.t()) if b is not None else h_c @ W.t()  # [c, V], matmul dtype
        scale_c = row_scale[start:end] if row_scale is not None else None
        loss[start:end], g = _chunk_loss_grad(backend, logits, y[start:end], opts, want_grad, scale_c)
        if grad_h is not None:
            torch.mm(g, W, out=grad_h[start:end])
        if grad_W is not None:
            if start == 0:
                torch.mm(g.t(), h_c, out=grad_W)
            else:
                grad_W.addmm_(g.t(), h_c)
        if grad_b is not None:
            grad_b += g.float().sum(0)
        del logits, g  # one chunk of logits alive at a time
    if N == 0 and grad_W is not None:
        grad_W.zero_()
    return loss, grad_h, grad_W, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    """Fused lm_head + CE over flattened ``h [N, H]``, ``W [V, H]``, ``b [V] | None``, ``y [N]``."""

    @staticmethod
    def forward(ctx, h, W, b, y, opts, backend, chunk, reduction, denom):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        ctx.reduction, ctx.opts, ctx.backend, ctx.chunk = reduction, opts, backend, chunk
        ctx.bias_dtype = b.dtype if b is not None else None
        if reduction == "none":
            loss, *_ = _linear_ce_pass(h, W, b, y, opts, backend, chunk, (False, False, False))
            ctx.save_for_backward(h, W, b, y)
            ctx.needs = needs
            return loss
        loss, grad_h, grad_W, grad_b = _linear_ce_pass(h, W, b, y, opts, backend, chunk, needs)
        ctx.save_for_backward(grad_h, grad_W, grad_b, denom)
        # denom == 0 only when every label is ignored: the loss is then 0, not 0 / 0.
        return loss.sum() / denom.clamp_min(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            h, W, b, y = ctx.saved_tensors
            scale = grad_out.float().contiguous()
            _, grad_h, grad_W, grad_b = _linear_ce_pass(h, W, b, y, ctx.opts, ctx.backend, ctx.chunk,
                                                        ctx.needs, row_scale=scale)
        else:
            if getattr(ctx, "used", False):
                raise RuntimeError("fastllm's fused linear cross-entropy serves one backward per forward: it computes "
                                   "the gradients in forward and scales them in place here (as Liger's fused loss "
                                   "does). Compute the loss again for another backward, or patch with "
                                   "PatchConfig(loss=False) to keep the logits for retain_graph")
            ctx.used = True
            grad_h, grad_W, grad_b, denom = ctx.saved_tensors
            factor = grad_out.float() / denom.clamp_min(1)
            # In place: these buffers were made for this backward and are handed over, not copied.
            for g in (grad_h, grad_W, grad_b):
                if g is not None:
                    g.mul_(factor)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_h, grad_W, grad_b, None, None, None, None, None, None


def flatten_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the "
                         "token dimensions (expected hidden = labels.shape + (H,))")
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


def autocast_inputs(h, W, b):
    """Under autocast, cast like ``nn.Linear`` would (the matmuls below use ``out=``, which autocast
    skips); the casts are autograd ops, so gradients come back in the parameters' own dtype."""
    if not torch.is_autocast_enabled(h.device.type):
        return h, W, b
    dt = torch.get_autocast_dtype(h.device.type)
    return h.to(dt), W.to(dt), (b.to(dt) if b is not None else None)


def resolve_chunk(chunk_size, h, W) -> int:
    if chunk_size is None:
        return auto_chunk_size(h.shape[0], h.shape[1], W.shape[0], h.dtype, h.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         logit_softcap: float | None = None, chunk_size: int | None = None,
                         num_items_in_batch: int | torch.Tensor | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` without the logits.

    Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``, ``labels [...]`` (int64). Returns a
    scalar, or ``labels.shape`` fp32 for ``reduction="none"`` (0 at ignored tokens). Per token:
    ``lse - (1-eps) z_y - eps/V sum_j z_j + z_loss * lse**2`` with ``z = softcap(logits)``; "mean"
    divides by the number of non-ignored tokens (0 of them -> loss 0, zero grads);
    ``num_items_in_batch`` divides the sum by that count instead (transformers' convention).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if logit_softcap is not None and logit_softcap <= 0:
        raise ValueError(f"logit_softcap must be positive or None, got {logit_softcap}")
    h, y = flatten_rows(hidden, labels)
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must be [V, {h.shape[1]}], got {tuple(weight.shape)}")
    backend = pick_backend(backend, h.device)
    opts = dict(ignore_index=ignore_index, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                logit_softcap=logit_softcap)
    chunk = resolve_chunk(chunk_size, h, weight)
    if num_items_in_batch is not None and reduction != "none":
        denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=h.device)
        reduction = "sum"
    elif reduction == "mean":
        denom = (y != ignore_index).sum().float()
    else:
        denom = torch.ones((), dtype=torch.float32, device=h.device)
    h, weight, bias = autocast_inputs(h, weight, bias)
    with torch.autocast(h.device.type, enabled=False):
        out = _LinearCrossEntropy.apply(h.contiguous(), weight, bias, y.contiguous(), opts, backend, chunk,
                                        reduction, denom)
    return out.reshape(labels.shape) if reduction == "none" else out
