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

import torch

from .nf4 import _bias_grad, _linear_bwd_input, _linear_fwd, _state_args

__all__ = ["LoRANF4Function", "lora_nf4_linear"]


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


class LoRANF4Function(torch.autograd.Function):
    """``x @ dequant(weight).T + b + scale * (x @ A.T) @ B.T`` with gradients for x, A, B and b."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale: float, backend: str):
        state = _state_args(weight.quant_state)
        y = _linear_fwd(x, weight, state, bias, backend)  # (..., N), a fresh tensor in x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        with _no_autocast(x):
            # Compute-dtype copies, saved for backward (LoRA-sized) so it does not cast them again: every
            # cast is a launch, and small-model steps are host-bound.
            Ac, Bc = A.to(x.dtype), B.to(x.dtype)
            xa = x2 @ Ac.t()  # (M, r)
            y.view(-1, y.shape[-1]).addmm_(xa, Bc.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, weight, Ac, Bc)
        ctx.ab_dtypes = (A.dtype, B.dtype)
        ctx.quant_state, ctx.backend, ctx.scale = weight.quant_state, backend, scale
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, Ac, Bc = ctx.saved_tensors  # Ac, Bc: A, B in the compute dtype (x2.dtype)
        a_dtype, b_dtype = ctx.ab_dtypes
        s = ctx.scale
        dy2 = dy.reshape(-1, dy.shape[-1])
        dt = x2.dtype
        dx = dA = dB = db = None
        with _no_autocast(dy):
            dy2 = dy2.to(dt)
            g = dy2 @ Bc  # (M, r)
            if ctx.needs_input_grad[0]:
                dx = _linear_bwd_input(dy2, weight, _state_args(ctx.quant_state), ctx.backend)  # (M, K)
                dx.addmm_(g, Ac, alpha=s)
                dx = dx.view(ctx.x_shape)
            if ctx.needs_input_grad[3]:
                dA = torch.mm(g.t(), x2).mul_(s).to(a_dtype)  # (r, K)
            if ctx.needs_input_grad[4]:
                dB = torch.mm(dy2.t(), xa).mul_(s).to(b_dtype)  # (N, r)
        if ctx.needs_input_grad[2]:
            db = _bias_grad(dy, ctx.bias_dtype)
        return dx, None, db, dA, dB, None, None


def lora_nf4_linear(x: torch.Tensor, weight, A: torch.Tensor, B: torch.Tensor, scale: float,
                    bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """The QLoRA linear ``x @ dequant(weight).T + bias + scale * (x @ A.T) @ B.T``.

    x: (..., K) in the compute dtype; weight: a bnb NF4 ``Params4bit`` (quant_state.shape (N, K));
    A: (r, K); B: (N, r) (any float dtype, e.g. fp32 masters). Returns (..., N) in x.dtype.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"LoRA weights must be A (r, K) and B (N, r), got {tuple(A.shape)} and {tuple(B.shape)}")
    return LoRANF4Function.apply(x, weight, bias, A, B, float(scale), backend)
