"""The whole QLoRA SwiGLU MLP (gate, up, SwiGLU, down, each projection NF4 + one LoRA) in one autograd Function.

With ``W* = dequant(weight*)``, adapters ``A*`` (r, ·), ``B*`` (·, r), scales ``s*``, x (M, K), I the
intermediate size (leading dims flattened)::

    forward   g = x @ Wg.T + sg * (x @ Ag.T) @ Bg.T          (M, I)
              u = x @ Wu.T + su * (x @ Au.T) @ Bu.T          (M, I)
              h = silu(g) * u                                (M, I)
              y = h @ Wd.T + sd * (h @ Ad.T) @ Bd.T          (M, K)
    backward  dh      = dy @ Wd + sd * (dy @ Bd) @ Ad        and dAd, dBd (see ``lora_group_backward``)
              dg, du  = SwiGLU backward of dh
              dx      = [dg | du] @ [Wg; Wu] + [sg dg @ Bg | su du @ Bu] @ [Ag; Au]

Why one Function: PEFT runs each of the three projections as ~8 ops plus an autograd node, and small-model
QLoRA steps are bound by that host work, not by the GPU (tens of microseconds per op). Here gate and
up are one stacked projection (``lora_group_forward``): one dequant launch, one GEMM to ``gu = [g | u]``
(M, 2I), one ``x @ [Ag; Au].T``; SwiGLU reads and writes that packed layout, so the backward's dx is one GEMM
over ``[dg | du]``. Forward: 2 dequant launches, 2 base GEMMs, 4 rank-r GEMMs, one SwiGLU kernel, one node.
Saved for backward: x, gu, h, the (M, 2r) and (M, r) LoRA activations; on ctx: the packed weights (never a dense
weight) and the cached compute-dtype adapter copies in one buffer (``cast_adapters``). In a checkpoint's recompute
(``need_output=False``) the down projection is skipped: its output is dropped there.
"""

from __future__ import annotations

import torch

from .._compat import pick_backend
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
from .swiglu import swiglu_packed_backward, swiglu_packed_forward

__all__ = ["LoRAMLPFunction", "lora_mlp", "mlp_adapters", "mlp_backward", "mlp_forward"]

POSITION_OF_ARG = (0, 2, 1, 3, 4, 5)  # (Ag, Au, Bg, Bu, Ad, Bd) positions of Ag, Bg, Au, Bu, Ad, Bd
ARG_OF_POSITION = tuple(POSITION_OF_ARG.index(i) for i in range(6))  # and the reverse: the argument at each position


def mlp_forward(x2, frozen: LoRAFrozen, flat, shapes, need_output: bool = True, views=None):
    """The MLP on x2 (M, K) with the compute-dtype adapters ``flat`` (``cast_adapters`` of (Ag, Au, Bg, Bu, Ad, Bd),
    shapes ``shapes``); no autograd. Returns (y (M, K), saved) with saved = (gu, h, xa_gu, had) for
    ``mlp_backward``; y is uninitialised when not ``need_output`` (the down projection skipped). ``views``:
    ``flat``'s views, when the caller has them."""
    wg, wu, wd = frozen.weights
    stg, stu, std = frozen.states
    sg, su, sd = frozen.scales
    _, _, Bgc, Buc, Adc, Bdc = adapter_views(flat, shapes) if views is None else views
    r_gu = shapes[0][0] + shapes[1][0]
    gu, xa_gu = lora_group_forward(x2, (wg, wu), (stg, stu), stacked_rows(flat, r_gu, x2.shape[1]),
                                   (Bgc, Buc), (sg, su), frozen.backend, exact=frozen.exact)  # (M, 2I) = [g | u]
    h = swiglu_packed_forward(gu, frozen.use_triton, frozen.gelu)
    if need_output:
        y, had = lora_group_forward(h, (wd,), (std,), Adc, (Bdc,), (sd,), frozen.backend, exact=frozen.exact)
    else:  # a checkpoint's recompute: only the saved tensors matter, y is dropped
        had, y = h @ Adc.t(), torch.empty_like(x2)
    return y, (gu, h, xa_gu, had)


def mlp_backward(dy2, x2, saved, frozen: LoRAFrozen, flat, shapes, need_dx: bool = True, views=None):
    """Gradients of ``mlp_forward`` for dy2 (M, K): (dx2 or None, gflat), gflat holding the adapter grads in
    ``flat``'s layout and dtype. ``saved`` as a list is consumed (emptied): h is dropped once the down projection's
    backward has read it, and [dg | du] overwrites gu, so the (M, I)-wide buffers alive at once are gu, h and dh
    rather than gu, h, dh and dgu. A tuple (autograd's saved tensors, which a second backward may read) is left as
    it is."""
    consume = isinstance(saved, list)
    gu, h, xa_gu, had = saved
    if consume:
        saved.clear()
    _, _, Bgc, Buc, Adc, Bdc = adapter_views(flat, shapes) if views is None else views
    gflat = torch.empty_like(flat)
    _, _, gBg, gBu, gAd, gBd = adapter_views(gflat, shapes)
    wg, wu, wd = frozen.weights
    stg, stu, std = frozen.states
    sg, su, sd = frozen.scales
    dh = lora_group_backward((dy2,), h, had, (wd,), (std,), Adc, (Bdc,), (sd,), frozen.backend, gAd, (gBd,))
    del h, had
    # (M, 2I) = [dg | du]: one GEMM for dx
    dgu = swiglu_packed_backward(dh, gu, frozen.use_triton, frozen.gelu, inplace=consume)
    del dh, gu
    inter = dgu.shape[1] // 2
    r_gu = shapes[0][0] + shapes[1][0]
    dx = lora_group_backward(dgu.split_with_sizes([inter, inter], 1), x2, xa_gu, (wg, wu), (stg, stu),
                             stacked_rows(flat, r_gu, x2.shape[1]), (Bgc, Buc), (sg, su), frozen.backend,
                             stacked_rows(gflat, r_gu, x2.shape[1]), (gBg, gBu), need_dx=need_dx, dy_all=dgu)
    return dx, gflat


def mlp_adapters(Ag, Bg, Au, Bu, Ad, Bd) -> tuple:
    """The adapters in ``mlp_forward``'s flat order (A of gate over A of up first: one stacked GEMM)."""
    return Ag, Au, Bg, Bu, Ad, Bd


class LoRAMLPFunction(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` for three NF4 + LoRA projections, gradients for x and the six adapters."""

    @staticmethod
    def forward(ctx, x, Ag, Bg, Au, Bu, Ad, Bd, frozen: LoRAFrozen, need_output: bool = True):
        with no_autocast(x):  # once here; the helpers' own no_autocast() are then no-ops
            x2 = x.reshape(-1, x.shape[-1])
            order = mlp_adapters(Ag, Bg, Au, Bu, Ad, Bd)
            flat, views = cast_adapters(order, x.dtype, frozen.cast_cache)  # one launch, reused in backward
            ctx.shapes = tuple(p.shape for p in order)
            y, saved = mlp_forward(x2, frozen, flat, ctx.shapes, need_output, views)
            ctx.save_for_backward(x2, *saved)  # weights: frozen, on ctx.frozen
            ctx.flat, ctx.views = flat, views  # cached adapter copies (cast_adapters): on ctx, no checkpoint hooks
            ctx.frozen, ctx.x_shape = frozen, x.shape
            ctx.dtypes = tuple(p.dtype for p in order)
            return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, *saved = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        dx, gflat = mlp_backward(dy2, x2, saved, ctx.frozen, ctx.flat, ctx.shapes, ctx.needs_input_grad[0], ctx.views)
        needs = [ctx.needs_input_grad[1 + a] for a in ARG_OF_POSITION]
        out = master_grads(gflat, ctx.shapes, ctx.dtypes, needs)
        return (None if dx is None else dx.view(ctx.x_shape), *(out[i] for i in POSITION_OF_ARG), None, None)


def lora_mlp(x: torch.Tensor, gate: tuple, up: tuple, down: tuple, *, backend: str = "auto",
             need_output: bool = True, cast_cache: str | None = None, gelu: bool = False) -> torch.Tensor:
    """The QLoRA SwiGLU MLP (``gelu``: GeGLU, Gemma's GELU-tanh gate) in one op. Each of gate/up/down is
    ``(weight, A, B, scale)``: a bnb NF4 ``Params4bit`` weight (quant_state.shape (N, K)), A (r, K), B (N, r) in
    any float dtype, a float scale.

    x: (..., H) in the compute dtype; gate/up weights (I, H), down (H, I). Returns (..., H) in x.dtype.
    ``need_output=False`` (a checkpoint's recompute, where only the saved tensors are used) skips the down
    projection (its dequant and both GEMMs: a seventh of the layer's GEMM work) and returns uninitialised memory
    of the output's shape, with the same saved tensors and the same backward. ``cast_cache``: see
    ``ops.lora.cast_adapters``.
    """
    parts = (gate, up, down)
    frozen = frozen_parts(parts, ("gate", "up", "down"), backend, pick_backend(backend, x.device) == "triton",
                          cast_cache)._replace(gelu=gelu)
    (i_g, h_g), (i_u, h_u), (h_d, i_d) = (tuple(s[7]) for s in frozen.states)
    if not (h_g == h_u == h_d == x.shape[-1] and i_g == i_u == i_d):
        raise ValueError(f"MLP weights do not chain: gate {(i_g, h_g)}, up {(i_u, h_u)}, down {(h_d, i_d)} "
                         f"for x (..., {x.shape[-1]})")
    return LoRAMLPFunction.apply(x, gate[1], gate[2], up[1], up[2], down[1], down[2], frozen, need_output)
