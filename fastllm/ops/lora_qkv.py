"""The attention input projections q, k, v (each NF4 + one LoRA, one shared input) in one autograd Function.

With ``W* = dequant(weight*)``, adapters ``A*`` (r, H), ``B*`` (N*, r), scales ``s*`` and x (M, H)::

    forward   p = x @ Wp.T (+ bp) + sp * (x @ Ap.T) @ Bp.T   p in q, k, v:  (M, Nq), (M, Nk), (M, Nv)
    backward  dx = sum over p of  dp @ Wp + sp * (dp @ Bp) @ Ap     (one (M, H) buffer, accumulated)
              dAp = sp * (dp @ Bp).T @ x ,  dBp = sp * dp.T @ (x @ Ap.T)

One node and one gradient buffer instead of three PEFT layers (about eight ops and an autograd node each):
the step is host-bound on small models (see ``fastllm.ops.lora_mlp``). Saved for backward: x and the three
(M, r) LoRA activations; on ctx: the packed weights and the cached compute-dtype adapter copies.
"""

from __future__ import annotations

import torch

from .lora import (
    LoRAFrozen,
    adapter_views,
    cast_adapters,
    frozen_parts,
    lora_group_backward,
    lora_group_forward,
    master_grads,
    stacked_rows,
)
from .nf4 import no_autocast

__all__ = ["LoRAQKVFunction", "lora_qkv", "qkv_adapters", "qkv_backward", "qkv_forward"]

POSITION_OF_ARG = (0, 3, 1, 4, 2, 5)  # (Aq, Ak, Av, Bq, Bk, Bv) positions of Aq, Bq, Ak, Bk, Av, Bv
ARG_OF_POSITION = tuple(POSITION_OF_ARG.index(i) for i in range(6))  # and the reverse: the argument at each position


def qkv_adapters(Aq, Bq, Ak, Bk, Av, Bv) -> tuple:
    """The adapters in ``qkv_forward``'s flat order (the three A first: one stacked GEMM)."""
    return Aq, Ak, Av, Bq, Bk, Bv


def qkv_forward(x2, frozen: LoRAFrozen, flat, shapes, views=None):
    """q/k/v of x2 (M, K) with the compute-dtype adapters ``flat`` (``cast_adapters`` of ``qkv_adapters``' order,
    shapes ``shapes``; ``views``: its views, when the caller has them); no autograd. Returns
    (y (M, Nq + Nk + Nv), xa (M, rq + rk + rv))."""
    casts = adapter_views(flat, shapes) if views is None else views
    r = sum(a[0] for a in shapes[:3])
    return lora_group_forward(x2, frozen.weights, frozen.states, stacked_rows(flat, r, x2.shape[1]), casts[3:],
                              frozen.scales, frozen.backend, frozen.bias, exact=frozen.exact)


def qkv_backward(dys, x2, xa, frozen: LoRAFrozen, flat, shapes, need_dx: bool = True, views=None):
    """Gradients of ``qkv_forward`` for ``dys`` = (dq, dk, dv), each (M, N*) or None (unused): (dx2 or None,
    gflat), gflat holding the adapter grads in ``flat``'s layout and dtype."""
    casts = adapter_views(flat, shapes) if views is None else views  # Aq, Ak, Av, Bq, Bk, Bv
    gflat = torch.empty_like(flat)
    grads = adapter_views(gflat, shapes)
    r = sum(a[0] for a in shapes[:3])
    dx = lora_group_backward(dys, x2, xa, frozen.weights, frozen.states, stacked_rows(flat, r, x2.shape[1]),
                             casts[3:], frozen.scales, frozen.backend, stacked_rows(gflat, r, x2.shape[1]),
                             grads[3:], need_dx=need_dx)
    return dx, gflat


class LoRAQKVFunction(torch.autograd.Function):
    """(q, k, v) = three NF4 + LoRA projections of one x; gradients for x and the six adapter weights."""

    @staticmethod
    def forward(ctx, x, Aq, Bq, Ak, Bk, Av, Bv, frozen: LoRAFrozen):
        with no_autocast(x):  # once here; the helpers' own no_autocast() are then no-ops
            x2 = x.reshape(-1, x.shape[-1])
            order = qkv_adapters(Aq, Bq, Ak, Bk, Av, Bv)
            flat, views = cast_adapters(order, x.dtype, frozen.cast_cache)  # one launch, reused in backward
            ctx.shapes = tuple(p.shape for p in order)
            y, xa = qkv_forward(x2, frozen, flat, ctx.shapes, views)
            ctx.save_for_backward(x2, xa)  # weights: frozen, on ctx.frozen
            ctx.flat, ctx.views = flat, views  # cached adapter copies (cast_adapters): on ctx, no checkpoint hooks
            ctx.dtypes = tuple(p.dtype for p in order)
            ctx.set_materialize_grads(False)  # an unused output's gradient stays None: skipped, as PEFT would
            ctx.frozen, ctx.x_shape = frozen, x.shape
            # column blocks of one (M, Nq + Nk + Nv) output: RoPE and attention read them in place
            cols = y.split_with_sizes([s[0] for s in ctx.shapes[3:]], 1)
            return tuple(o.view(*x.shape[:-1], o.shape[-1]) for o in cols)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x2, xa = ctx.saved_tensors
        dys = [None if d is None else d.reshape(-1, d.shape[-1]).to(x2.dtype) for d in (dq, dk, dv)]
        dx, gflat = qkv_backward(dys, x2, xa, ctx.frozen, ctx.flat, ctx.shapes, ctx.needs_input_grad[0], ctx.views)
        needs = [ctx.needs_input_grad[1 + a] for a in ARG_OF_POSITION]
        for i, d in enumerate((dq, dk, dv)):  # an unused output: no gradient for its adapter, as PEFT
            if d is None:
                needs[i] = needs[3 + i] = False
        out = master_grads(gflat, ctx.shapes, ctx.dtypes, needs)
        return (None if dx is None else dx.view(ctx.x_shape), *(out[i] for i in POSITION_OF_ARG), None)


def lora_qkv(x: torch.Tensor, q: tuple, k: tuple, v: tuple, *, bias: torch.Tensor | None = None,
             backend: str = "auto", cast_cache: str | None = None):
    """(q, k, v) of one input in one op. Each of q/k/v is ``(weight, A, B, scale)``: a bnb NF4 ``Params4bit``
    weight (quant_state.shape (N, H)), A (r, H), B (N, r) in any float dtype, a float scale. ``bias``: None or
    the frozen biases of q, k and v concatenated (Nq + Nk + Nv,) (no gradient: it does not train).

    x: (..., H) in the compute dtype; returns three (..., N*) tensors in x.dtype. ``cast_cache``: see
    ``ops.lora.cast_adapters``.
    """
    frozen = frozen_parts((q, k, v), "qkv", backend, False, cast_cache)
    if bias is not None:
        n = sum(s[7][0] for s in frozen.states)
        if bias.shape != (n,) or bias.requires_grad:
            raise ValueError(f"lora_qkv's bias must be the frozen (Nq + Nk + Nv,) = ({n},) vector, got "
                             f"{tuple(bias.shape)}{' requiring grad' if bias.requires_grad else ''}")
        frozen = frozen._replace(bias=bias)
    if any(s[7][1] != x.shape[-1] for s in frozen.states):
        raise ValueError(f"q/k/v weights {[tuple(s[7]) for s in frozen.states]} do not take x (..., {x.shape[-1]})")
    return LoRAQKVFunction.apply(x, q[1], q[2], k[1], k[2], v[1], v[2], frozen)
