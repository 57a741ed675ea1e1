"""The QLoRA linear in one autograd Function: frozen NF4 base weight plus one LoRA adapter.

With ``W = dequant(weight)`` (N, K), ``A`` (r, K), ``B`` (N, r), scale ``s`` and x (M, K) (leading
dims flattened)::

    forward   xa = x @ A.T                      (M, r)
              y  = x @ W.T + b + s * xa @ B.T   (M, N)   the LoRA term added in place (addmm epilogue)
    backward  g  = dy @ B                       (M, r)
              dx = dy @ W + s * g @ A           (M, K)   W dequantized again, LoRA added in place
              dA = s * g.T @ x                  (r, K)
              dB = s * dy.T @ xa                (N, r)
              db = sum over rows of dy

PEFT's ``lora.Linear4bit`` computes the same with a defensive ``clone`` of the base output, a cast of
``x`` to the adapter's dtype, a separate ``* scaling`` and ``+``: five extra passes over an (M, N)
tensor per call. Here everything runs in x's (compute) dtype, as PEFT does under autocast; the
adapter's own dtype (fp32 master weights) only receives the gradients. Saved for backward: x, the
small ``xa`` (M, r), the packed 4-bit weight (never a dense copy) and the adapter weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .nf4 import _bias_grad, _linear_bwd_input, _linear_fwd, _state_args, no_autocast, plain_tensor

__all__ = ["LoRAFrozen", "LoRANF4Function", "adapter_views", "cast_adapters", "check_adapter", "frozen_parts",
           "lora_backward", "lora_forward", "lora_nf4_linear", "shared_down_projection"]


class LoRAFrozen(NamedTuple):
    """What a multi-projection QLoRA op needs besides the adapter weights (which autograd must see as inputs)."""

    weights: tuple          # packed NF4 bytes of each projection, as plain tensors (``plain_tensor``)
    states: tuple           # ``_state_args`` of each quant state
    scales: tuple           # LoRA scale of each projection (floats)
    backend: str
    use_triton: bool        # for an elementwise kernel between projections (the MLP's SwiGLU)


def cast_adapters(params, dtype: torch.dtype) -> tuple[torch.Tensor, tuple]:
    """The adapter weights ``params`` cast to the compute ``dtype`` in one launch: (flat buffer, views).

    One ``cat`` into a flat buffer instead of a cast per weight, and one tensor to save for backward
    (``adapter_views`` re-views it there): each cast is a launch, and each saved tensor costs checkpointing's
    pack/unpack hooks, on a host-bound step. Call without grad mode (inside an autograd Function).
    """
    flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
    torch.cat([p.reshape(-1) for p in params], out=flat)
    return flat, adapter_views(flat, tuple(p.shape for p in params))


def adapter_views(flat: torch.Tensor, shapes: tuple) -> tuple:
    """Views of ``flat`` shaped as ``shapes``, in order (the inverse of ``cast_adapters``' concatenation)."""
    sizes = [s[0] * s[1] for s in shapes]
    return tuple(v.view(s) for v, s in zip(flat.split(sizes), shapes))


def shared_down_projection(x2: torch.Tensor, flat: torch.Tensor, ranks: tuple) -> tuple:
    """``x2 @ A_i.T`` for adapters whose A (r_i, K) lie one after another at the start of ``flat`` (as
    ``cast_adapters`` lays them out): one GEMM for all of them, x2 (M, K) -> (M, sum r_i), and that output's
    column views (M, r_i). Projections of one input (gate/up, q/k/v) share it: one launch instead of three."""
    k = x2.shape[-1]
    stacked = flat[: sum(ranks) * k].view(-1, k)  # (sum r_i, K): A_1 over A_2 over ...
    with no_autocast(x2):
        xa = x2 @ stacked.t()
    return xa, xa.split(list(ranks), dim=1)


def lora_forward(x2, weight, state: tuple, Ac, Bc, scale: float, bias, backend: str, xa=None):
    """``y = x2 @ W.T + b + scale * xa @ Bc.T`` and ``xa = x2 @ Ac.T``, no autograd.

    x2: (M, K) in the compute dtype; Ac (r, K) and Bc (N, r) already in it; ``xa`` when already computed
    (``shared_down_projection``). Returns (y (M, N), xa (M, r)).
    """
    y = _linear_fwd(x2, weight, state, bias, backend)  # a fresh tensor
    with no_autocast(x2):
        if xa is None:
            xa = x2 @ Ac.t()
        y.addmm_(xa, Bc.t(), alpha=scale)  # the LoRA term added in place
    return y, xa


def lora_backward(dy2, x2, xa, weight, state: tuple, Ac, Bc, scale: float, backend: str, *,
                  need_dx: bool = True, dx_out: torch.Tensor | None = None):
    """Gradients of ``lora_forward`` for upstream dy2 (M, N), no autograd: (dx, dA, dB) in the compute dtype.

    dx = dy2 @ W + scale * (dy2 @ Bc) @ Ac, accumulated into ``dx_out`` (M, K) when given; dx is None when
    not ``need_dx``. dA = scale * (dy2 @ Bc).T @ x2 (r, K); dB = scale * dy2.T @ xa (N, r).
    """
    dx = None
    with no_autocast(dy2):
        g = torch.mm(dy2, Bc)  # (M, r), scaled once here for both dx and dA
        dB = torch.mm(dy2.t(), xa)
        if scale != 1.0:  # lora_alpha == r (scale 1) is common: two launches fewer
            g.mul_(scale)
            dB.mul_(scale)
        if need_dx:
            dx = _linear_bwd_input(dy2, weight, state, backend, out=dx_out)
            dx.addmm_(g, Ac)
        dA = torch.mm(g.t(), x2)
    return dx, dA, dB


class LoRANF4Function(torch.autograd.Function):
    """``x @ dequant(W).T + b + scale * (x @ A.T) @ B.T`` with gradients for x, A, B and b.

    The packed weight and its quant state ride in ``frozen`` (a one-projection ``LoRAFrozen``): frozen, so
    kept on ctx rather than saved through autograd (no checkpoint pack/unpack hooks per call).
    """

    @staticmethod
    def forward(ctx, x, bias, A, B, frozen: LoRAFrozen):
        with no_autocast(x):  # once here; the helpers' own no_autocast() are then no-ops
            (weight,), (state,), (scale,) = frozen.weights, frozen.states, frozen.scales
            x2 = x.reshape(-1, x.shape[-1])
            # Compute-dtype copies, saved for backward (LoRA-sized) so it does not cast them again.
            flat, (Ac, Bc) = cast_adapters((A, B), x.dtype)
            y, xa = lora_forward(x2, weight, state, Ac, Bc, scale, bias, frozen.backend)
            ctx.save_for_backward(x2, xa, flat)
            ctx.ab_dtypes, ctx.ab_shapes = (A.dtype, B.dtype), (A.shape, B.shape)
            ctx.frozen, ctx.x_shape = frozen, x.shape
            ctx.bias_dtype = None if bias is None else bias.dtype
            return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, flat = ctx.saved_tensors
        Ac, Bc = adapter_views(flat, ctx.ab_shapes)  # A, B in the compute dtype (x2.dtype)
        f = ctx.frozen
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        dx, dA, dB = lora_backward(dy2, x2, xa, f.weights[0], f.states[0], Ac, Bc, f.scales[0], f.backend,
                                   need_dx=ctx.needs_input_grad[0])
        db = _bias_grad(dy, ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        dx = None if dx is None else dx.view(ctx.x_shape)
        dA = dA.to(ctx.ab_dtypes[0]) if ctx.needs_input_grad[2] else None
        dB = dB.to(ctx.ab_dtypes[1]) if ctx.needs_input_grad[3] else None
        return dx, db, dA, dB, None


def lora_nf4_linear(x: torch.Tensor, weight, A: torch.Tensor, B: torch.Tensor, scale: float,
                    bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """The QLoRA linear ``x @ dequant(weight).T + bias + scale * (x @ A.T) @ B.T``.

    x: (..., K) in the compute dtype; weight: a bnb NF4 ``Params4bit`` (quant_state.shape (N, K));
    A: (r, K); B: (N, r) (any float dtype, e.g. fp32 masters). Returns (..., N) in x.dtype.
    """
    frozen = frozen_parts(((weight, A, B, scale),), ("",), backend, False)
    return LoRANF4Function.apply(x, bias, A, B, frozen)


def check_adapter(A: torch.Tensor, B: torch.Tensor, prefix: str = "") -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"{prefix}LoRA weights must be A (r, K) and B (N, r), "
                         f"got {tuple(A.shape)} and {tuple(B.shape)}")


def frozen_parts(parts, names, backend: str, use_triton: bool) -> LoRAFrozen:
    """Check each projection's ``(weight, A, B, scale)`` and gather what gets no gradient."""
    for name, (_, A, B, _) in zip(names, parts):
        check_adapter(A, B, f"{name}: " if name else "")
    states = tuple(_state_args(w.quant_state) for w, *_ in parts)
    weights = tuple(plain_tensor(p[0]) for p in parts)
    return LoRAFrozen(weights, states, tuple(float(p[3]) for p in parts), backend, use_triton)
