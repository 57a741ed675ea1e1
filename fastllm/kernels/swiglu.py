"""Gated-MLP elementwise Triton kernels: ``h = act(g) * u`` and its gradient, act SiLU (SwiGLU: Llama, Mistral, Qwen)
or, with ``GELU``, GELU's tanh approximation (GeGLU: Gemma, ``gelu_pytorch_tanh``). The SiLU maths below; GELU's is
``a = 0.5 g (1 + tanh(c (g + 0.044715 g^3)))``, ``a' = 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 * 0.044715 g^2)``
(c = sqrt(2 / pi)), rounded at the same places.

Forward (fp32 inside, rounded where eager ``F.silu(g) * u`` rounds, so both give the same bits)::
    a = cast(g / (1 + exp(-g)))      silu(g), rounded to the tensors' dtype as F.silu's output is
    h = a * u
Backward, with s = sigmoid(g), rounded as eager's autograd rounds its products::
    dg = cast(dh * u) * s * (1 + g * (1 - s))
    du = dh * a

Backward recomputes ``sigmoid(g)`` from the saved ``g`` and ``u`` instead of saving ``silu(g)``:
one activation of size [tokens, intermediate] less per MLP than eager. The gradients go to fresh
buffers, not over ``g`` and ``u``: another autograd node may still hold those.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch

_BLOCK = 1024


@triton.jit
def _tanh_of_gelu(g):
    """tanh(c (g + 0.044715 g^3)) for fp32 g, through a sigmoid (tanh z = 2 sigmoid(2z) - 1)."""
    z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _act_rounded(g, dtype: tl.constexpr, GELU: tl.constexpr):
    """act(g) for fp32 g, rounded to ``dtype`` and back: the eager activation's formula and its one rounding."""
    if GELU:
        a = 0.5 * g * (1.0 + _tanh_of_gelu(g))
    else:
        a = g / (1.0 + tl.exp(-g))
    return a.to(dtype).to(tl.float32)


@triton.jit
def _act_grad(g, GELU: tl.constexpr):
    """d act / dg for fp32 g."""
    if GELU:
        t = _tanh_of_gelu(g)
        return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    s = tl.sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


@triton.jit
def _swiglu_fwd_kernel(G, U, H, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    h = _act_rounded(g, H.dtype.element_ty, GELU) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DH, G, U, DG, DU, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dg = (dh * u).to(DG.dtype.element_ty).to(tl.float32) * _act_grad(g, GELU)
    du = dh * _act_rounded(g, DU.dtype.element_ty, GELU)
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_packed_fwd_kernel(GU, H, inter, BLOCK: tl.constexpr, GELU: tl.constexpr):
    """Row ``pid(0)`` of gu (M, 2I) = [g | u]: h[row] = act(g[row]) * u[row], h (M, I)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(GU + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    h = _act_rounded(g, H.dtype.element_ty, GELU) * u
    tl.store(H + row * inter + cols, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_packed_bwd_kernel(DH, GU, DGU, inter, BLOCK: tl.constexpr, GELU: tl.constexpr):
    """dgu[row] = [dg | du] of h = act(g) * u for gu[row] = [g | u]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dh = tl.load(DH + row * inter + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GU + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dg = (dh * u).to(DGU.dtype.element_ty).to(tl.float32) * _act_grad(g, GELU)
    du = dh * _act_rounded(g, DGU.dtype.element_ty, GELU)
    tl.store(DGU + row * 2 * inter + cols, dg.to(DGU.dtype.element_ty), mask=mask)
    tl.store(DGU + row * 2 * inter + inter + cols, du.to(DGU.dtype.element_ty), mask=mask)


def swiglu_packed_fwd(gu: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """gu (M, 2I) contiguous, gate columns then up columns (one stacked GEMM's output). Returns h (M, I)."""
    m, two_i = gu.shape
    h = gu.new_empty(m, two_i // 2)
    launch(_swiglu_packed_fwd_kernel, (m, cdiv(two_i // 2, _BLOCK)), gu, h, two_i // 2, BLOCK=_BLOCK,
           GELU=gelu, num_warps=4)
    return h


def swiglu_packed_bwd(dh: torch.Tensor, gu: torch.Tensor, gelu: bool = False,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """dh (M, I), gu (M, 2I) contiguous. Returns dgu (M, 2I) = [dg | du], gu's layout (one GEMM takes it), written
    to ``out`` when given: ``out=gu`` is safe (each element is read by the program that writes it, before it does),
    and saves a (M, 2I) buffer where gu is not needed afterwards."""
    m, two_i = gu.shape
    dgu = torch.empty_like(gu) if out is None else out
    launch(_swiglu_packed_bwd_kernel, (m, cdiv(two_i // 2, _BLOCK)), dh.contiguous(), gu, dgu, two_i // 2,
           BLOCK=_BLOCK, GELU=gelu, num_warps=4)
    return dgu


def swiglu_fwd(g: torch.Tensor, u: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """g, u: contiguous, same shape and dtype. Returns act(g) * u (SiLU, or GELU-tanh with ``gelu``)."""
    h = torch.empty_like(g)
    n = g.numel()
    launch(_swiglu_fwd_kernel, (cdiv(n, _BLOCK),), g, u, h, n, BLOCK=_BLOCK, GELU=gelu, num_warps=4)
    return h


def swiglu_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
               gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dg, du), each shaped and typed like g."""
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    launch(_swiglu_bwd_kernel, (cdiv(n, _BLOCK),), dh.contiguous(), g, u, dg, du, n, BLOCK=_BLOCK, GELU=gelu,
           num_warps=4)
    return dg, du
