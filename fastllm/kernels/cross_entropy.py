"""Fused cross-entropy over one chunk of logits: logsumexp, per-row loss and closed-form gradient.

For a row of logits ``x`` (length ``V``), an optional softcap ``c``, label smoothing ``eps``,
z-loss weight ``zl`` and target ``y``:

    z_j   = c * tanh(x_j / c)                (or z = x without softcap)
    lse   = log sum_j exp(z_j)               (online: running max m and rescaled sum s)
    loss  = lse - (1 - eps) * z_y - (eps / V) * sum_j z_j + zl * lse**2
    p_j   = exp(z_j - lse)
    dL/dz_j = p_j * (1 + 2 * zl * lse) - eps / V - (1 - eps) * [j == y]
    dL/dx_j = dL/dz_j * (1 - tanh(x_j / c)**2)   (softcap chain rule)

This is the target distribution ``(1 - eps) * onehot(y) + eps / V`` of ``F.cross_entropy(...,
label_smoothing=eps)`` plus PaLM's z-loss. Rows whose label is ``ignore_index`` get loss 0 and a
zero gradient. One kernel launch per chunk; each program owns one row and reads it twice (pass 1
for the logsumexp, pass 2 for the gradient), then writes the gradient **in place** over the logits
so the chunk needs no second ``[n, V]`` buffer. Arithmetic is fp32 whatever the storage dtype:
the logits are upcast in registers and the gradient is cast back on store.

References: Liger-Kernel ``ops/cross_entropy.py`` (same two-pass row scheme), Wijmans et al. 2024
"Cut Your Losses in Large-Vocabulary Language Models" (the z-loss/softcap options).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, next_power_of_2


@triton.jit
def _softcap(x, cap):
    """cap * tanh(x / cap) and tanh(x / cap); tanh through exp, which the interpreter also has."""
    t = 1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0)
    return cap * t, t


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr, stride, labels_ptr, loss_ptr, lse_ptr, scale_ptr,
    V, ignore_index, smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row: loss[row], lse[row] and, if COMPUTE_GRAD, scale[row] * dL/dx written over the row."""
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    y = tl.load(labels_ptr + row).to(tl.int64)
    offs = tl.arange(0, BLOCK)

    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK):
                cols = start + offs
                tl.store(ptr + cols, tl.zeros([BLOCK], dtype=tl.float32).to(logits_ptr.dtype.element_ty),
                         mask=cols < V)
        return

    # Pass 1: online logsumexp (running max m, sum s rescaled whenever m grows) and sum of z.
    m = -float("inf")
    s = 0.0
    z_sum = 0.0
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        x = tl.load(ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_SOFTCAP:
            # softcap(-inf) = -cap, so the padding lanes must be masked again after it.
            x, _ = _softcap(x, softcap)
            x = tl.where(mask, x, -float("inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)

    z_y = tl.load(ptr + y).to(tl.float32)
    if HAS_SOFTCAP:
        z_y, _ = _softcap(z_y, softcap)
    loss = lse - (1.0 - smoothing) * z_y + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss -= smoothing / V * z_sum
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)

    # Pass 2: closed-form gradient, written over the logits it was computed from.
    if COMPUTE_GRAD:
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr + row).to(tl.float32)
        coef = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z, t = _softcap(x, softcap)
            else:
                z = x
            g = tl.exp(z - lse) * coef - smoothing / V
            g = tl.where(cols == y, g - (1.0 - smoothing), g)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(ptr + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _launch_config(V: int) -> tuple[int, int]:
    """The one place that maps a vocab width to (BLOCK, num_warps)."""
    block = min(next_power_of_2(V), 16384)
    num_warps = 16 if block >= 8192 else (8 if block >= 2048 else 4)
    return block, num_warps


def cross_entropy_chunk(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                        label_smoothing: float = 0.0, z_loss: float = 0.0, logit_softcap: float | None = None,
                        compute_grad: bool = True, row_scale: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and logsumexp of ``logits`` ``[n, V]``; with ``compute_grad`` the gradient
    ``row_scale[i] * dloss_i / dlogits_i`` (``row_scale`` defaults to 1) replaces ``logits`` in place.

    Returns ``(loss [n] fp32, lse [n] fp32)``; ``lse`` is 0 on ignored rows. ``logits`` must have a
    unit stride along V. Labels outside ``[0, V)`` other than ``ignore_index`` are undefined behaviour
    (not checked here: the check would cost a device sync per chunk).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with unit stride on the vocab axis, got {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss, lse
    if row_scale is not None:
        row_scale = row_scale.reshape(n).contiguous()
    block, num_warps = _launch_config(V)
    scale_arg = row_scale if row_scale is not None else loss  # unread when HAS_SCALE is False
    launch(
        _cross_entropy_fwd_kernel, (n,),
        logits, logits.stride(0), labels.contiguous(), loss, lse, scale_arg,
        V, ignore_index, float(label_smoothing), float(z_loss), float(logit_softcap or 1.0),
        HAS_SOFTCAP=logit_softcap is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_SCALE=row_scale is not None, COMPUTE_GRAD=compute_grad, BLOCK=block, num_warps=num_warps,
    )
    return loss, lse
