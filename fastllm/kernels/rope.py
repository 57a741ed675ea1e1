"""Rotary position embedding (Llama's rotate-half form) for q and k of one token row in one launch.

With a head ``x = [x1, x2]`` split at ``HALF = D / 2`` and the token's ``cos``/``sin`` rows (transformers'
position embeddings, length D; ``c1, c2`` / ``s1, s2`` their halves)::

    forward   y1 = x1 * c1 - x2 * s1          y2 = x2 * c2 + x1 * s2
    backward  dx1 = dy1 * c1 + dy2 * s2        dx2 = dy2 * c2 - dy1 * s1

which is ``x * cos + rotate_half(x) * sin`` and its transpose (``rotate_half(x) = [-x2, x1]``). fp32 inside,
each product and the sum rounded to the output dtype where transformers' op-by-op maths rounds them (a bf16
product of bf16 inputs is exact in fp32, so the results are transformers' bits); compiled without fp fusion.
Layout: q (rows, nq, D) and k (rows, nk, D), rows = batch * seq, each row contiguous (any row stride: q and
k may be column blocks of one fused q/k/v output); cos, sin (cos_rows, D)
contiguous, with cos_rows = seq (one position row shared by the batch) or rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, next_power_of_2


@triton.jit
def _r(v, dtype: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype`` and back (a no-op for fp32): where a torch op in ``dtype`` rounds."""
    return v.to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(X, Y, row, x_stride, y_stride, n_heads, c1, c2, s1, s2, D: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    """Heads of one row; a head's two halves are loaded before either is stored, so Y may be X (in place)."""
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    for h0 in range(0, n_heads, BLOCK_H):
        hh = h0 + h
        head = hh[:, None] * D + d[None, :]  # (BLOCK_H, BLOCK_D), first halves
        offs = row * y_stride + head   # input and output may each be a column block of a wider (rows, N) tensor
        xoffs = row * x_stride + head
        m = (hh[:, None] < n_heads) & (d[None, :] < HALF)
        x1 = tl.load(X + xoffs, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + xoffs + HALF, mask=m, other=0.0).to(tl.float32)
        dt = Y.dtype.element_ty
        if BACKWARD:
            y1 = _r(x1 * c1, dt) + _r(x2 * s2, dt)
            y2 = _r(x2 * c2, dt) - _r(x1 * s1, dt)
        else:
            y1 = _r(x1 * c1, dt) - _r(x2 * s1, dt)
            y2 = _r(x2 * c2, dt) + _r(x1 * s2, dt)
        tl.store(Y + offs, y1.to(Y.dtype.element_ty), mask=m)
        tl.store(Y + offs + HALF, y2.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, QO, KO, q_stride, k_stride, qo_stride, ko_stride, nq, nk, cos_rows,
                 D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                 BACKWARD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    crow = row % cos_rows  # the batch shares one position row when cos has seq rows only
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    c1 = tl.load(COS + crow * D + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + crow * D + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + crow * D + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + crow * D + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q, QO, row, q_stride, qo_stride, nq, c1, c2, s1, s2, D, HALF, BLOCK_H, BLOCK_D, BACKWARD)
    _rotate_heads(K, KO, row, k_stride, ko_stride, nk, c1, c2, s1, s2, D, HALF, BLOCK_H, BLOCK_D, BACKWARD)


def rope_apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               backward: bool = False, out: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (or, with ``backward``, gradient-rotated) q (rows, nq, D) and k (rows, nk, D), each contiguous within
    a row (stride(1) == D, stride(2) == 1) with any row stride: into ``out`` = (qo, ko) of the same shapes and
    layout rules (q and k themselves: in place), else into new contiguous tensors."""
    rows, nq, d = q.shape
    if out is None:
        out = (torch.empty(q.shape, dtype=q.dtype, device=q.device),
               torch.empty(k.shape, dtype=k.dtype, device=k.device))
    qo, ko = out
    half = d // 2
    block_h = min(16, next_power_of_2(max(nq, k.shape[1])))
    launch(_rope_kernel, (rows,), q, k, cos, sin, qo, ko, q.stride(0), k.stride(0), qo.stride(0), ko.stride(0), nq,
           k.shape[1], cos.shape[0], D=d, HALF=half, BLOCK_H=block_h, BLOCK_D=next_power_of_2(half),
           BACKWARD=backward, num_warps=4, enable_fp_fusion=False)
    return qo, ko
