"""RMSNorm forward and backward Triton kernels: the Llama / T5 form and Gemma's ``(1 + w)`` form.

Forward, per row ``x`` of width N (computed in fp32, as transformers does)::

    rstd = 1 / sqrt(mean(x^2) + eps)
    y    = w * cast(x * rstd, x.dtype)              offset 0 (Llama: x*rstd rounded before the weight)
    y    = cast(x * rstd * (offset + w), x.dtype)   offset != 0 (Gemma: all in fp32, one rounding)

Backward, with ``xhat = x * rstd`` and ``g = dy * (offset + w)``::

    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum_rows(dy * xhat)              (only when the weight needs a gradient)

``rstd`` is saved per row (4 bytes a row) so backward re-reads ``x`` instead of a normalised copy.
References: Zhang & Sennrich 2019 (RMSNorm); Liger-Kernel's rms_norm for the partial-dW layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2


@triton.jit
def _row_offsets(rows, stride_x, heads, stride_h):
    """Where row ``rows`` of x starts: x is (M / heads, heads, N) with strides (stride_x, stride_h, 1), e.g. the
    per-head q or k columns of a fused q/k/v output read in place (heads = 1: plain rows)."""
    return (rows // heads) * stride_x + (rows % heads) * stride_h


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_h, heads, stride_y, M, N, eps, BLOCK_M: tl.constexpr,
                         BLOCK: tl.constexpr, OFFSET: tl.constexpr):
    """BLOCK_M rows per program: y = w * cast(x * rstd) (OFFSET 0) or cast(x * rstd * (OFFSET + w)); rstd stored."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    xrow = _row_offsets(rows, stride_x, heads, stride_h)
    x = tl.load(X + xrow[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)  # (BLOCK_M,)
    if OFFSET == 0.0:
        # Round the normalised row to the input dtype before the weight multiply, like transformers' Llama.
        xhat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    else:
        xhat = x * rstd[:, None]  # Gemma: the whole product in fp32, rounded once
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], ((w + OFFSET) * xhat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_h, heads, stride_dx, M, N,
                         TILES_PER_PROG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                         HAS_DW: tl.constexpr, OFFSET: tl.constexpr):
    """Each program walks TILES_PER_PROG tiles of BLOCK_M rows: dx per row, and one partial dW row per program."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < N
    w = (tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + OFFSET)[None, :]
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(TILES_PER_PROG):
        rows = (pid * TILES_PER_PROG + i).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xrow = _row_offsets(rows, stride_x, heads, stride_h)
        x = tl.load(X + xrow[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)  # rows past M load as zeros
    if HAS_DW:
        tl.store(DW_PART + pid * N + cols, dw_acc, mask=col_ok)


# Elements one program holds at a time when rows are narrow: a per-head q/k norm (rows of the head dim, 128) would
# otherwise be one tiny program per row (8B: 131K of them per norm, and backward walking hundreds of rows in turn).
TILE_ELEMENTS = 4096


def _launch_config(n: int) -> tuple[int, int, int]:
    """The one place that maps a row width to (BLOCK, BLOCK_M rows per tile, num_warps)."""
    block = next_power_of_2(n)
    if block > 65536:
        raise ValueError(f"rms_norm Triton kernel supports rows up to 65536 wide, got {n}")
    block_m = max(1, TILE_ELEMENTS // block)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return block, block_m, num_warps


def _rows(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(M rows, N, row stride, head stride, heads) of x: (M, N), or (M / H, H, N) read as M rows; unit last stride."""
    if x.stride(-1) != 1 or x.dim() not in (2, 3):
        raise ValueError(f"rms_norm kernels take (rows, N) or (rows, heads, N) with unit last stride, got "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if x.dim() == 2:
        return x.shape[0], x.shape[1], x.stride(0), 0, 1
    return x.shape[0] * x.shape[1], x.shape[2], x.stride(0), x.stride(1), x.shape[1]


def rms_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d: (M, N) with unit last stride, or (M / H, H, N) (per-head rows read in place, any outer strides).
    Returns y (M, N) contiguous in result_type(x, w) (offset 0) or x's dtype (offset != 0, Gemma), and rstd (M,)
    fp32."""
    m, n, stride_x, stride_h, heads = _rows(x2d)
    y = torch.empty((m, n), dtype=torch.result_type(x2d, weight) if offset == 0 else x2d.dtype, device=x2d.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x2d.device)
    block, block_m, num_warps = _launch_config(n)
    launch(_rms_norm_fwd_kernel, (cdiv(m, block_m),), x2d, weight, y, rstd, stride_x, stride_h, heads, y.stride(0), m,
           n, eps, BLOCK_M=block_m, BLOCK=block, OFFSET=float(offset), num_warps=num_warps)
    return y, rstd


def rms_norm_bwd(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 need_dw: bool, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dy2d (M, N); x2d as ``rms_norm_fwd`` took it. Returns dx (M, N) contiguous in x's dtype and dw (N,) in w's
    dtype (or None)."""
    m, n, stride_x, stride_h, heads = _rows(x2d)
    dy2d = dy2d.contiguous()
    dx = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    block, block_m, num_warps = _launch_config(n)
    tiles = cdiv(m, block_m)
    if x2d.is_cuda:
        sms = torch.cuda.get_device_properties(x2d.device).multi_processor_count
        programs = min(tiles, 4 * sms)
    else:
        programs = min(tiles, 8)
    programs = max(programs, 1)
    tiles_per_prog = cdiv(tiles, programs)
    programs = cdiv(tiles, tiles_per_prog)
    dw_part = torch.empty((programs, n), dtype=torch.float32, device=x2d.device) if need_dw else dx
    launch(_rms_norm_bwd_kernel, (programs,), dy2d, x2d, weight, rstd, dx, dw_part, dy2d.stride(0), stride_x,
           stride_h, heads, dx.stride(0), m, n, TILES_PER_PROG=tiles_per_prog, BLOCK_M=block_m, BLOCK=block,
           HAS_DW=need_dw, OFFSET=float(offset), num_warps=num_warps)
    dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw
