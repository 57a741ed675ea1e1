"""A decode step's adapter inputs ``xa_i = x @ A_i.T`` for up to three adapters of one input, as K-split partials,
in one launch and without casting the adapters first::

    part[j, m, off_i + r] = sum_{k in range j} x[m, k] * round(A_i[r, k])        x: (M, K), A_i: (R_i, K)

``round`` is the cast to x's dtype that PEFT's forward under autocast applies to the fp32 adapter masters; each
product is then exact in fp32 and the sum is fp32, as in the bf16 GEMM of the unfused path (there: the masters cast
into a buffer, one launch, then a split-K GEMM and its reduction, two more). The consumer (the NF4 GEMV's LoRA term,
``kernels.nf4_gemv.lora_term``) adds the ``SPLIT`` partials in split order (deterministic) and rounds xa to x's
dtype, as the GEMM's output is rounded.

Program (i, j): ``BLOCK_R`` adapter rows of adapter ``i // TILES`` and K range j (``KS`` elements); one row on the
CUDA cores (products summed over the tile once, after the K loop), several on the tensor cores (``tl.dot``, rows
padded to 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2
from .pdl import pdl_enter, pdl_options

MAX_ADAPTERS = 3
_BLOCK_K = 128
# K ranges: with the adapters' row tiles, enough programs to keep memory busy at decode sizes; fewer with more rows,
# where every consumer program adds up SPLIT x M x R partials
_TARGET_SPLIT = {1: 32, 4: 32, 16: 16}  # most rows -> splits (beyond: 8)


@triton.jit
def _xa_tile(X, stride_x, A, R, rm, rr, M, K, k_lo, k_hi, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
             BLOCK_K: tl.constexpr, DOT: tl.constexpr, FP32: tl.constexpr):
    """sum over k in [k_lo, k_hi) of x[rm, k] * round(A[rr, k]): (BLOCK_M, BLOCK_R) fp32."""
    dt = X.dtype.element_ty
    rk = tl.arange(0, BLOCK_K)
    m_ok = (rm < M)[:, None]
    r_ok = (rr < R)[:, None]
    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    else:
        lanes = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + rk
        k_ok = (k < k_hi)[None, :]
        x = tl.load(X + rm[:, None] * stride_x + k[None, :], mask=m_ok & k_ok, other=0.0)  # (BLOCK_M, BLOCK_K)
        a = tl.load(A + rr[:, None] * K + k[None, :], mask=r_ok & k_ok, other=0.0).to(dt)  # (BLOCK_R, BLOCK_K)
        if DOT:
            if FP32:
                acc += tl.dot(x, tl.trans(a), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(a))
        else:
            lanes += x.to(tl.float32)[:, None, :] * a.to(tl.float32)[None, :, :]
    if not DOT:
        acc = tl.sum(lanes, axis=2)
    return acc


@triton.jit
def _lora_xa_kernel(X, stride_x, PART, A0, A1, A2, R0, R1, R2, M, K, KS, R_ALL, TILES,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                    FP32: tl.constexpr, PDL: tl.constexpr):
    """Program (i, j): adapter i // TILES (its rows from (i % TILES) * BLOCK_R), K range j, into PART[j]."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    which = pid // TILES
    rr = (pid % TILES) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = tl.arange(0, BLOCK_M)
    k_lo = tl.program_id(1) * KS
    k_hi = tl.minimum(k_lo + KS, K)
    if which == 0:
        acc = _xa_tile(X, stride_x, A0, R0, rm, rr, M, K, k_lo, k_hi, BLOCK_M, BLOCK_R, BLOCK_K, DOT, FP32)
        col, r = 0 * R0, R0
    elif which == 1:
        acc = _xa_tile(X, stride_x, A1, R1, rm, rr, M, K, k_lo, k_hi, BLOCK_M, BLOCK_R, BLOCK_K, DOT, FP32)
        col, r = R0, R1
    else:
        acc = _xa_tile(X, stride_x, A2, R2, rm, rr, M, K, k_lo, k_hi, BLOCK_M, BLOCK_R, BLOCK_K, DOT, FP32)
        col, r = R0 + R1, R2
    out = PART + tl.program_id(1) * M * R_ALL + rm[:, None] * R_ALL + col + rr[None, :]
    tl.store(out, acc, mask=(rm < M)[:, None] & (rr < r)[None, :])


def xa_split(k: int, m: int = 1) -> int:
    """The number of K ranges (partials) ``lora_xa`` writes for in_features ``k`` and ``m`` token rows."""
    steps = cdiv(k, _BLOCK_K)
    target = next((t for rows, t in _TARGET_SPLIT.items() if m <= rows), 8)
    return cdiv(steps, cdiv(steps, target))


def lora_xa(x: torch.Tensor, adapters) -> torch.Tensor:
    """The K-split partials of ``x @ [A_0; A_1; ..].T`` (see the module docstring): (SPLIT, M, sum R_i) fp32.

    x: (M, K) fp32, fp16 or bf16 with unit stride along K; adapters: 1 to 3 contiguous (R_i, K) tensors on x's
    device, any float dtype (rounded to x's dtype as they are read). SPLIT is ``xa_split(K, M)``."""
    m, k = x.shape
    if not 1 <= len(adapters) <= MAX_ADAPTERS:
        raise ValueError(f"lora_xa takes 1 to {MAX_ADAPTERS} adapters, got {len(adapters)}")
    if x.stride(1) != 1 or any(a.dim() != 2 or a.shape[1] != k or not a.is_contiguous() for a in adapters):
        raise ValueError(f"lora_xa needs x (M, {k}) with unit stride along K and contiguous (R_i, {k}) adapters")
    ranks = [a.shape[0] for a in adapters]
    split = xa_split(k, m)
    steps = cdiv(k, _BLOCK_K)
    part = torch.empty((split, m, sum(ranks)), dtype=torch.float32, device=x.device)
    dot = m > 4
    block_r = min(64, max(16, next_power_of_2(max(ranks)))) if dot else min(16, next_power_of_2(max(ranks)))
    tiles = cdiv(max(ranks), block_r)
    a = list(adapters) + [adapters[0]] * (MAX_ADAPTERS - len(adapters))
    r = ranks + [0] * (MAX_ADAPTERS - len(ranks))
    launch(_lora_xa_kernel, (tiles * len(adapters), split), x, x.stride(0), part, *a, *r, m, k,
           cdiv(steps, split) * _BLOCK_K, sum(ranks), tiles,
           BLOCK_M=max(16, next_power_of_2(m)) if dot else next_power_of_2(m), BLOCK_R=block_r, BLOCK_K=_BLOCK_K,
           DOT=dot, FP32=x.dtype.itemsize == 4, **pdl_options(x))
    return part
