"""Rotary position embedding of q and k (Llama's rotate-half form) as one op, with a torch fallback.

``rope(q, k, cos, sin)`` equals transformers' ``apply_rotary_pos_emb`` in the (batch, seq, heads, D) layout
the projections produce (before the head transpose)::

    y = x * cos + rotate_half(x) * sin,    rotate_half([x1, x2]) = [-x2, x1]
    dx = dy * cos + rotate_half^T(dy * sin),   rotate_half^T([g1, g2]) = [g2, -g1]

q (B, T, nq, D), k (B, T, nk, D); cos, sin (B or 1, T, D). One Triton launch for both q and k forward and
one backward (transformers: ~16 ops forward, as many backward). Each product and the sum are rounded to the
tensors' dtype where transformers' ops round them, so the results are transformers' bits in every dtype (decode
logits would otherwise drift from eager's over many steps).
"""

from __future__ import annotations

import torch

from .._compat import pick_backend, records_graph

__all__ = ["rope", "rope_rotate", "rope_tables"]


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x (rows, heads, D); cos/sin (rows, 1, D) in x's dtype: each op rounds as transformers' do."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    if backward:
        return torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), dim=-1)
    return torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)


def _apply(q, k, cos, sin, use_triton: bool, backward: bool, inplace: bool = False):
    """q, k flattened to (rows, heads, D); cos, sin (cos_rows, D) contiguous; ``inplace`` writes into q and k."""
    if use_triton:
        from ..kernels.rope import rope_apply

        return rope_apply(q, k, cos, sin, backward, out=(q, k) if inplace else None)
    rows = q.shape[0]
    reps = rows // cos.shape[0]
    c = cos.to(q.dtype).repeat(reps, 1)[:, None, :]  # (rows, 1, D): row b*T + t takes position row t
    s = sin.to(q.dtype).repeat(reps, 1)[:, None, :]
    qo, ko = _rotate_torch(q, c, s, backward), _rotate_torch(k, c, s, backward)
    return (q.copy_(qo), k.copy_(ko)) if inplace else (qo, ko)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, D) as (B * T, heads, D) with contiguous rows, copied only when it must be: a column block
    of the fused q/k/v output ((B, T, N) sliced) is read in place."""
    rows = x.reshape(-1, *x.shape[2:])  # a view whenever the batch and sequence strides chain
    if rows.stride(2) != 1 or rows.stride(1) != rows.shape[2]:
        return rows.contiguous()
    return rows


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B or 1, T, D) as the (B*T or T, D) contiguous tables ``rope_rotate`` reads."""
    return cos.reshape(-1, cos.shape[-1]).contiguous(), sin.reshape(-1, sin.shape[-1]).contiguous()


def rope_rotate(q, k, c, s, use_triton: bool, backward: bool = False, inplace: bool = False):
    """RoPE (or, ``backward``, its transpose for gradients) of q (B, T, nq, D) and k (B, T, nk, D) with the
    ``rope_tables`` c, s; no autograd. Returns new contiguous tensors of q's and k's shapes, or with ``inplace``
    q and k themselves rotated (where their rows are views, as the column blocks of the fused q/k/v output are: no
    copies, the pre-rotation values are gone; elsewhere new tensors)."""
    rq, rk = _rows(q), _rows(k)
    if inplace and rq.data_ptr() == q.data_ptr() and rk.data_ptr() == k.data_ptr():
        _apply(rq, rk, c, s, use_triton, backward, inplace=True)
        return q, k
    qo, ko = _apply(rq, rk, c, s, use_triton, backward)
    return qo.view(q.shape), ko.view(k.shape)


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, use_triton: bool):
        c, s = rope_tables(cos, sin)
        ctx.save_for_backward(c, s)
        ctx.use_triton = use_triton
        return rope_rotate(q, k, c, s, use_triton)

    @staticmethod
    def backward(ctx, dq, dk):
        c, s = ctx.saved_tensors
        dqi, dki = rope_rotate(dq, dk, c, s, ctx.use_triton, backward=True)
        return dqi, dki, None, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q (B, T, nq, D) and k (B, T, nk, D) with cos, sin (B or 1, T, D). Returns rotated (q, k)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1] or q.shape[-1] % 2:
        raise ValueError(f"rope needs q (B, T, nq, D) and k (B, T, nk, D) with one even D, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    B, T, _, D = q.shape
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (T, D) or cos.shape[0] not in (1, B):
        raise ValueError(f"rope needs cos and sin of shape (1 or {B}, {T}, {D}), got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    use_triton = pick_backend(backend, q.device) == "triton"
    if records_graph(q, k):
        return _RoPEFunction.apply(q, k, cos, sin, use_triton)
    return rope_rotate(q, k, *rope_tables(cos, sin), use_triton)  # no graph to record: no autograd.Function
