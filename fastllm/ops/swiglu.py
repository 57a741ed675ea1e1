"""Gated-MLP elementwise ops ``act(g) * u`` that save g and u (not act(g)) for backward: ``swiglu`` (act = SiLU:
Llama, Mistral, Qwen) and ``geglu`` (act = GELU's tanh approximation, ``gelu_pytorch_tanh``: Gemma).

g, u: same shape and dtype, e.g. (B, T, I). Triton kernels on CUDA; the same closed form in torch
elsewhere. Both round where eager ``act(g) * u`` rounds (the activation's output, then the product), so a patched
MLP gives eager's bits and decode logits do not drift from eager's over many steps. The ``gelu`` flag of the
plain functions below picks GELU-tanh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._compat import pick_backend, records_graph


def _act_torch(g: torch.Tensor, gelu: bool) -> torch.Tensor:
    return F.gelu(g, approximate="tanh") if gelu else F.silu(g)


def _fwd_torch(g: torch.Tensor, u: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    return _act_torch(g, gelu) * u  # eager's own ops: each rounds to g's dtype


def _act_grad_torch(gf: torch.Tensor, gelu: bool) -> torch.Tensor:
    """d act / dg in fp32 for fp32 g (the closed forms in ``kernels.swiglu``)."""
    if gelu:
        t = torch.tanh(0.7978845608028654 * (gf + 0.044715 * gf.pow(3)))
        return 0.5 * (1 + t) + 0.5 * gf * (1 - t * t) * 0.7978845608028654 * (1 + 0.134145 * gf * gf)
    s = torch.sigmoid(gf)
    return s * (1 + gf * (1 - s))


def _bwd_torch(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
               gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """dg = cast(dh * u) * act'(g), du = dh * act(g): eager autograd's roundings."""
    dg = (dh * u).float() * _act_grad_torch(g.float(), gelu)
    return dg.to(g.dtype), dh * _act_torch(g, gelu)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor, use_triton: bool, gelu: bool = False) -> torch.Tensor:
    """``act(g) * u`` without autograd (contiguous g, u); for Functions that fuse more around it."""
    if use_triton:
        from ..kernels.swiglu import swiglu_fwd

        return swiglu_fwd(g, u, gelu)
    return _fwd_torch(g, u, gelu)


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                    use_triton: bool, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) of ``h = act(g) * u`` for upstream ``dh``, without autograd."""
    if use_triton:
        from ..kernels.swiglu import swiglu_bwd

        return swiglu_bwd(dh, g, u, gelu)
    return _bwd_torch(dh, g, u, gelu)


def swiglu_packed_forward(gu: torch.Tensor, use_triton: bool, gelu: bool = False) -> torch.Tensor:
    """h = act(g) * u for gu (M, 2I) = [g | u] (contiguous), without autograd: h (M, I)."""
    if use_triton:
        from ..kernels.swiglu import swiglu_packed_fwd

        return swiglu_packed_fwd(gu, gelu)
    g, u = gu.chunk(2, dim=-1)
    return _fwd_torch(g, u, gelu)


def swiglu_packed_backward(dh: torch.Tensor, gu: torch.Tensor, use_triton: bool, gelu: bool = False,
                           inplace: bool = False) -> torch.Tensor:
    """dgu (M, 2I) = [dg | du] of ``swiglu_packed_forward`` for upstream dh (M, I), without autograd; ``inplace``
    writes it over gu (the caller's last use of gu: one (M, 2I) buffer less at the backward's peak)."""
    if use_triton:
        from ..kernels.swiglu import swiglu_packed_bwd

        return swiglu_packed_bwd(dh, gu, gelu, out=gu if inplace else None)
    g, u = gu.chunk(2, dim=-1)
    dg, du = _bwd_torch(dh, g, u, gelu)
    if inplace:
        inter = g.shape[-1]
        gu.narrow(-1, 0, inter).copy_(dg)  # narrow: one view, which may be written (chunk's may not)
        gu.narrow(-1, inter, inter).copy_(du)
        return gu
    return torch.cat((dg, du), dim=-1)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, use_triton: bool, gelu: bool) -> torch.Tensor:
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        ctx.use_triton, ctx.gelu = use_triton, gelu
        return swiglu_forward(g, u, use_triton, gelu)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        dg, du = swiglu_backward(dh, g, u, ctx.use_triton, ctx.gelu)
        return dg, du, None, None


def _gated(g: torch.Tensor, u: torch.Tensor, backend: str, gelu: bool) -> torch.Tensor:
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"{'geglu' if gelu else 'swiglu'} needs g and u of one shape and dtype, got "
                         f"{tuple(g.shape)} {g.dtype} and {tuple(u.shape)} {u.dtype}")
    use_triton = pick_backend(backend, g.device) == "triton"
    if records_graph(g, u):
        return _SwiGLUFunction.apply(g, u, use_triton, gelu)
    # no graph to record: no autograd.Function
    return swiglu_forward(g.contiguous(), u.contiguous(), use_triton, gelu)


def swiglu(g: torch.Tensor, u: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(g) * u``; ``backend`` is "auto" (Triton on CUDA), "triton" or "torch"."""
    return _gated(g, u, backend, False)


def geglu(g: torch.Tensor, u: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``gelu_tanh(g) * u`` (transformers' ``gelu_pytorch_tanh``); ``backend`` as ``swiglu``'s."""
    return _gated(g, u, backend, True)
