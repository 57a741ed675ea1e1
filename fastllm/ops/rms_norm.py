"""RMSNorm op: Triton kernels on CUDA, the same maths in torch elsewhere.

``rms_norm(x, weight, eps)`` equals transformers' ``LlamaRMSNorm``:
``weight * cast(x * rsqrt(mean(x^2) + eps), x.dtype)`` with statistics in fp32; output dtype
``result_type(x, weight)``. ``rms_norm(x, weight, eps, offset=1.0)`` equals ``Gemma3RMSNorm``:
``cast(x * rsqrt(mean(x^2) + eps) * (1 + weight), x.dtype)`` all in fp32; output in x's dtype.
x: (..., N), weight: (N,).
"""

from __future__ import annotations

import torch

from .._compat import pick_backend, records_graph


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:  # Gemma: (offset + w) in fp32, one rounding at the end
        return (xf * (offset + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        from ..kernels.rms_norm import rms_norm_fwd

        x2d = x.reshape(-1, x.shape[-1]).contiguous()  # (M, N)
        y, rstd = rms_norm_fwd(x2d, weight, eps, offset)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.x_shape, ctx.offset = x.shape, offset
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from ..kernels.rms_norm import rms_norm_bwd

        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy.reshape(-1, dy.shape[-1]), x2d, weight, rstd, ctx.needs_input_grad[1], ctx.offset)
        return dx.view(ctx.x_shape), dw, None, None


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float, use_triton: bool, offset: float = 0.0):
    """RMSNorm of x2d (M, N), or of (M / H, H, N) per-head rows (the q or k columns of a fused q/k/v output, read
    where they lie), without autograd: (y (M, N), state) with state for ``rms_norm_backward``. Triton: one kernel,
    state (x, weight, rstd, offset); torch: transformers' maths, state (x, weight, eps, offset)."""
    if use_triton:
        from ..kernels.rms_norm import rms_norm_fwd

        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y, rstd = rms_norm_fwd(x2d, weight, eps, offset)
        return y, (x2d, weight, rstd, offset)
    x2d = x2d.reshape(-1, x2d.shape[-1])
    return _rms_norm_torch(x2d, weight, eps, offset), (x2d, weight, eps, offset)


def rms_norm_backward(dy2d: torch.Tensor, state: tuple, use_triton: bool) -> torch.Tensor:
    """dx (M, N) of ``rms_norm_forward`` for dy2d (M, N); the weight gets no gradient (frozen norms)."""
    x2d, weight, extra, offset = state
    if use_triton:
        from ..kernels.rms_norm import rms_norm_bwd

        return rms_norm_bwd(dy2d, x2d, weight, extra, False, offset)[0]
    with torch.enable_grad():  # the fallback differentiates transformers' own maths
        xr = x2d.detach().requires_grad_()
        (dx,) = torch.autograd.grad(_rms_norm_torch(xr, weight.detach(), extra, offset), xr, dy2d)
    return dx


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0,
             backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim (``offset``: 0 for the Llama form, 1 for Gemma's ``(1 + w)`` form, see above);
    ``backend`` is "auto" (Triton on CUDA), "triton" or "torch"."""
    if pick_backend(backend, x.device) == "triton":
        if records_graph(x, weight):
            return _RMSNormFunction.apply(x, weight, eps, offset)
        # no graph to record (inference, decode): the kernel alone, without autograd.Function's ~20 us of host work
        y, _ = rms_norm_forward(x.reshape(-1, x.shape[-1]), weight, eps, True, offset)
        return y.view(*x.shape[:-1], y.shape[-1])
    return _rms_norm_torch(x, weight, eps, offset)
