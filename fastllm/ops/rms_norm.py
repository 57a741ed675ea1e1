"""RMSNorm op: Triton kernels on CUDA, the same maths in torch elsewhere.

``rms_norm(x, weight, eps)`` equals transformers' ``LlamaRMSNorm``:
``weight * cast(x * rsqrt(mean(x^2) + eps), x.dtype)`` with statistics in fp32.
x: (..., N), weight: (N,). Output dtype is ``result_type(x, weight)``.
"""

from __future__ import annotations

import torch

from .._compat import pick_backend


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from ..kernels.rms_norm import rms_norm_fwd

        x2d = x.reshape(-1, x.shape[-1]).contiguous()  # (M, N)
        y, rstd = rms_norm_fwd(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from ..kernels.rms_norm import rms_norm_bwd

        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy.reshape(-1, dy.shape[-1]), x2d, weight, rstd, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim; ``backend`` is "auto" (Triton on CUDA), "triton" or "torch"."""
    if pick_backend(backend, x.device) == "triton":
        return _RMSNormFunction.apply(x, weight, eps)
    return _rms_norm_torch(x, weight, eps)
