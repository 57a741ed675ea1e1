"""SwiGLU elementwise op ``silu(g) * u`` that saves g and u (not silu(g)) for backward.

g, u: same shape and dtype, e.g. (B, T, I). Triton kernels on CUDA; the same closed form in torch
elsewhere. Both round where eager ``F.silu(g) * u`` rounds (silu's output, then the product), so a patched
MLP gives eager's bits and decode logits do not drift from eager's over many steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._compat import pick_backend, records_graph


def _fwd_torch(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u  # eager's own ops: each rounds to g's dtype


def _bwd_torch(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dg = cast(dh * u) * s * (1 + g (1 - s)), du = dh * silu(g): eager autograd's roundings."""
    gf = g.float()
    s = torch.sigmoid(gf)
    dg = (dh * u).float() * s * (1 + gf * (1 - s))
    return dg.to(g.dtype), dh * F.silu(g)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor, use_triton: bool) -> torch.Tensor:
    """``silu(g) * u`` without autograd (contiguous g, u); for Functions that fuse more around it."""
    if use_triton:
        from ..kernels.swiglu import swiglu_fwd

        return swiglu_fwd(g, u)
    return _fwd_torch(g, u)


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                    use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) of ``h = silu(g) * u`` for upstream ``dh``, without autograd."""
    if use_triton:
        from ..kernels.swiglu import swiglu_bwd

        return swiglu_bwd(dh, g, u)
    return _bwd_torch(dh, g, u)


def swiglu_packed_forward(gu: torch.Tensor, use_triton: bool) -> torch.Tensor:
    """h = silu(g) * u for gu (M, 2I) = [g | u] (contiguous), without autograd: h (M, I)."""
    if use_triton:
        from ..kernels.swiglu import swiglu_packed_fwd

        return swiglu_packed_fwd(gu)
    g, u = gu.chunk(2, dim=-1)
    return _fwd_torch(g, u)


def swiglu_packed_backward(dh: torch.Tensor, gu: torch.Tensor, use_triton: bool) -> torch.Tensor:
    """dgu (M, 2I) = [dg | du] of ``swiglu_packed_forward`` for upstream dh (M, I), without autograd."""
    if use_triton:
        from ..kernels.swiglu import swiglu_packed_bwd

        return swiglu_packed_bwd(dh, gu)
    g, u = gu.chunk(2, dim=-1)
    return torch.cat(_bwd_torch(dh, g, u), dim=-1)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, use_triton: bool) -> torch.Tensor:
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        ctx.use_triton = use_triton
        return swiglu_forward(g, u, use_triton)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        dg, du = swiglu_backward(dh, g, u, ctx.use_triton)
        return dg, du, None


def swiglu(g: torch.Tensor, u: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(g) * u``; ``backend`` is "auto" (Triton on CUDA), "triton" or "torch"."""
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"swiglu needs g and u of one shape and dtype, got {tuple(g.shape)} {g.dtype} "
                         f"and {tuple(u.shape)} {u.dtype}")
    use_triton = pick_backend(backend, g.device) == "triton"
    if records_graph(g, u):
        return _SwiGLUFunction.apply(g, u, use_triton)
    return swiglu_forward(g.contiguous(), u.contiguous(), use_triton)  # no graph to record: no autograd.Function
