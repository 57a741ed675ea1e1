"""The attention input projections q, k, v (each NF4 + one LoRA, one shared input) in one autograd Function.

With ``W* = dequant(weight*)``, adapters ``A*`` (r, H), ``B*`` (N*, r), scales ``s*`` and x (M, H)::

    forward   p = x @ Wp.T + sp * (x @ Ap.T) @ Bp.T          p in q, k, v:  (M, Nq), (M, Nk), (M, Nv)
    backward  dx = sum over p of  dp @ Wp + sp * (dp @ Bp) @ Ap     (one (M, H) buffer, accumulated)
              dAp = sp * (dp @ Bp).T @ x ,  dBp = sp * dp.T @ (x @ Ap.T)

One node and one gradient buffer instead of three PEFT layers (about eight ops and an autograd node each):
the step is host-bound on small models (see ``fastllm.ops.lora_mlp``). Saved for backward: x, the three
(M, r) LoRA activations, the packed weights and the compute-dtype adapter copies.
"""

from __future__ import annotations

import torch

from .lora import (
    LoRAFrozen,
    adapter_views,
    cast_adapters,
    frozen_parts,
    lora_backward,
    lora_forward,
    shared_down_projection,
)
from .nf4 import no_autocast

__all__ = ["LoRAQKVFunction", "lora_qkv"]


class LoRAQKVFunction(torch.autograd.Function):
    """(q, k, v) = three NF4 + LoRA projections of one x; gradients for x and the six adapter weights."""

    @staticmethod
    def forward(ctx, x, Aq, Bq, Ak, Bk, Av, Bv, frozen: LoRAFrozen):
        with no_autocast(x):  # once here; the helpers' own no_autocast() are then no-ops
            x2 = x.reshape(-1, x.shape[-1])
            # compute-dtype copies in one launch, reused in backward; Aq, Ak, Av first, for the shared GEMM
            order = (Aq, Ak, Av, Bq, Bk, Bv)
            flat, casts = cast_adapters(order, x.dtype)
            xa, acts = shared_down_projection(x2, flat, (Aq.shape[0], Ak.shape[0], Av.shape[0]))
            outs = []
            for i, (w, state, scale) in enumerate(zip(frozen.weights, frozen.states, frozen.scales)):
                y, _ = lora_forward(x2, w, state, casts[i], casts[3 + i], scale, None, frozen.backend, xa=acts[i])
                outs.append(y.view(*x.shape[:-1], y.shape[-1]))
            ctx.save_for_backward(x2, xa, flat)  # weights: frozen, on ctx.frozen
            ctx.shapes = tuple(p.shape for p in order)
            ctx.set_materialize_grads(False)  # an unused output's gradient stays None: skipped, as PEFT would
            ctx.frozen, ctx.x_shape = frozen, x.shape
            ctx.dtypes = tuple(p.dtype for p in (Aq, Bq, Ak, Bk, Av, Bv))
            return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x2, xa, flat = ctx.saved_tensors
        casts = adapter_views(flat, ctx.shapes)  # Aq, Ak, Av, Bq, Bk, Bv
        acts = xa.split([a.shape[0] for a in casts[:3]], dim=1)
        f = ctx.frozen
        weights = f.weights
        need_dx = ctx.needs_input_grad[0]
        dx, grads = None, []
        for i, dy in enumerate((dq, dk, dv)):
            if dy is None:  # an output nobody used: no gradient through it
                grads += [None, None]
                continue
            dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
            dx, dA, dB = lora_backward(dy2, x2, acts[i], weights[i], f.states[i], casts[i], casts[3 + i],
                                       f.scales[i], f.backend, need_dx=need_dx, dx_out=dx)
            grads += [dA, dB]
        grads = [None if d is None or not need else d.to(dt)
                 for d, dt, need in zip(grads, ctx.dtypes, ctx.needs_input_grad[1:7])]
        return (None if dx is None else dx.view(ctx.x_shape), *grads, None)


def lora_qkv(x: torch.Tensor, q: tuple, k: tuple, v: tuple, *, backend: str = "auto"):
    """(q, k, v) of one input in one op. Each of q/k/v is ``(weight, A, B, scale)``: a bnb NF4 ``Params4bit``
    weight (quant_state.shape (N, H)), A (r, H), B (N, r) in any float dtype, a float scale.

    x: (..., H) in the compute dtype; returns three (..., N*) tensors in x.dtype.
    """
    frozen = frozen_parts((q, k, v), "qkv", backend, False)
    if any(s[7][1] != x.shape[-1] for s in frozen.states):
        raise ValueError(f"q/k/v weights {[tuple(s[7]) for s in frozen.states]} do not take x (..., {x.shape[-1]})")
    return LoRAQKVFunction.apply(x, q[1], q[2], k[1], k[2], v[1], v[2], frozen)
