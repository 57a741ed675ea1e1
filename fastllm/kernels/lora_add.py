"""The rank-r LoRA term added in place, rounded as PEFT rounds it under autocast, in one launch::

    y = round(round(y) + round(s * round(xa @ B.T)))        y: (M, N), xa: (M, R), B: (N, R), fp32 sums

Why: at inference (a decode step after bitsandbytes' 4-bit GEMV, a prefill after dequant + GEMM) PEFT's rounding
costs three launches per projection in torch (the product, the scaling, the sum) and writes and reads the (M, N)
product between them; here each output element is read once and written once. The maths and the roundings are
the NF4 GEMV's epilogue (``nf4_gemv.lora_term``): on the CUDA cores up to 16 rows, on the tensor cores beyond.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2
from .nf4_gemv import lora_term


@triton.jit
def _lora_add_kernel(Y, stride_y, XA, stride_xa, Bw, s, M, N, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_R: tl.constexpr, DOT: tl.constexpr, FP32: tl.constexpr):
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    ptrs = Y + rm[:, None].to(tl.int64) * stride_y + rn[None, :]
    y = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    y = lora_term(y, Y, XA, stride_xa, 0, 1, Bw, s, rm, rn, M, N, R, BLOCK_R, DOT, FP32)
    tl.store(ptrs, y.to(Y.dtype.element_ty), mask=ok)


def lora_add(y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``y += s * xa @ b.T`` in place with PEFT's three roundings; y: (M, N) with unit stride along N (a column
    block of a wider buffer is fine), xa: (M, R) unit stride along R, b: (N, R); one dtype. Returns y."""
    m, n = y.shape
    r = b.shape[1]
    if y.stride(1) != 1 or xa.stride(1) != 1 or xa.shape != (m, r) or b.shape[0] != n:
        raise ValueError(f"lora_add needs y (M, N), xa (M, R) with unit last strides and b (N, R), got "
                         f"{tuple(y.shape)}, {tuple(xa.shape)}, {tuple(b.shape)}")
    dot = m > 16
    block_m = 64 if dot else next_power_of_2(m)
    block_r = min(64, max(16, next_power_of_2(r)))
    # CUDA cores: a (BLOCK_M, BLOCK_N, BLOCK_R) product of at most 4,096 elements a program (32 a thread), and
    # enough programs across N for a decode step's few rows
    block_n = 64 if dot else max(16, min(128, 4096 // (block_m * block_r)))
    launch(_lora_add_kernel, (cdiv(n, block_n), cdiv(m, block_m)), y, y.stride(0), xa, xa.stride(0),
           b.contiguous(), float(s), m, n, r, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, DOT=dot,
           FP32=y.dtype.itemsize == 4, enable_fp_fusion=False)
    return y
