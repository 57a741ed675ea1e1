"""Two or three NF4 GEMVs of one input in one launch (a decode step's q/k/v)::

    out_i = x @ W_i.T + bias_i + s_i * xa_i @ B_i.T        i < G; x: (M, K), W_i: (N_i, K), one blocksize, nesting

The maths, tiles and roundings are ``nf4_gemv``'s (its ``gemv_tile`` and ``gemv_end``); the program grid runs
over the projections' output tiles one after another (``T1``, ``T2``: where projections 1 and 2 start) and each
program takes its projection's operands, so q, k and v cost one launch (two with K split: one epilogue for all)
instead of three (six, or three with the last K range finishing: ``FINISH``). Also more programs in one launch: k
and v alone are 1,024 columns, too few tiles to fill the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2
from .nf4_gemv import (
    EPILOGUE_N,
    check_gemv,
    finish_operands,
    gemv_config,
    gemv_end,
    gemv_operands,
    gemv_tile,
    state_operands,
    xa_strides,
)
from .nf4_lut import lut_for
from .pdl import pdl_enter, pdl_options


@triton.jit
def _nf4_group_gemv_kernel(X, stride_x, PART, COUNT, CODE, stride_xa, stride_xs, xa_splits, M, K, KS, N_ALL, T1, T2,
                           P0, A0, C20, A20, O0, BIAS0, XA0, B0, s0, OUT0, N0, R0,
                           P1, A1, C21, A21, O1, BIAS1, XA1, B1, s1, OUT1, N1, R1,
                           P2, A2, C22, A22, O2, BIAS2, XA2, B2, s2, OUT2, N2, R2,
                           BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                           NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK_R: tl.constexpr, DOT: tl.constexpr, FP32: tl.constexpr, UNPACK: tl.constexpr,
                           SPLIT: tl.constexpr, PDL: tl.constexpr, LUT: tl.constexpr, FINISH: tl.constexpr):
    """Program (i, j): output tile i of the concatenated projections (0 below T1, 1 below T2, else 2), K range j
    (tile i's arrival counter ``COUNT + i`` with FINISH)."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    COUNT += pid
    if pid < T1:
        gemv_tile(X, stride_x, OUT0, N0, PART, COUNT, P0, A0, CODE, C20, A20, O0, BIAS0, XA0, stride_xa, stride_xs,
                  xa_splits, B0, s0, pid, 0, M, N0, N_ALL, K, KS, R0, BLOCKSIZE, BLOCKSIZE2, NESTED, HAS_BIAS,
                  HAS_LORA, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, BLOCK_R, DOT, FP32, UNPACK, SPLIT, LUT, FINISH)
    elif pid < T2:  # with two projections T2 is the tile count: no program gets past it
        gemv_tile(X, stride_x, OUT1, N1, PART, COUNT, P1, A1, CODE, C21, A21, O1, BIAS1, XA1, stride_xa, stride_xs,
                  xa_splits, B1, s1, pid - T1, N0, M, N1, N_ALL, K, KS, R1, BLOCKSIZE, BLOCKSIZE2, NESTED, HAS_BIAS,
                  HAS_LORA, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, BLOCK_R, DOT, FP32, UNPACK, SPLIT, LUT, FINISH)
    else:
        gemv_tile(X, stride_x, OUT2, N2, PART, COUNT, P2, A2, CODE, C22, A22, O2, BIAS2, XA2, stride_xa, stride_xs,
                  xa_splits, B2, s2, pid - T2, N0 + N1, M, N2, N_ALL, K, KS, R2, BLOCKSIZE, BLOCKSIZE2, NESTED,
                  HAS_BIAS, HAS_LORA, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, BLOCK_R, DOT, FP32, UNPACK, SPLIT, LUT, FINISH)


@triton.jit
def _group_epilogue_kernel(PART, stride_xa, stride_xs, xa_splits, M, N_ALL, T1, T2,
                           BIAS0, XA0, B0, s0, OUT0, N0, R0, BIAS1, XA1, B1, s1, OUT1, N1, R1,
                           BIAS2, XA2, B2, s2, OUT2, N2, R2,
                           SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
                           FP32: tl.constexpr, PDL: tl.constexpr):
    """A split-K group's end: each projection's partials summed, bias and LoRA term added, stored."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    if pid < T1:
        gemv_end(PART, OUT0, N0, BIAS0, XA0, stride_xa, stride_xs, xa_splits, B0, s0, R0, pid, 0, M, N0, N_ALL, SPLIT,
                 HAS_BIAS, HAS_LORA, BLOCK_M, BLOCK_N, BLOCK_R, DOT, FP32)
    elif pid < T2:  # with two projections T2 is the tile count: no program gets past it
        gemv_end(PART, OUT1, N1, BIAS1, XA1, stride_xa, stride_xs, xa_splits, B1, s1, R1, pid - T1, N0, M, N1, N_ALL,
                 SPLIT, HAS_BIAS, HAS_LORA, BLOCK_M, BLOCK_N, BLOCK_R, DOT, FP32)
    else:
        gemv_end(PART, OUT2, N2, BIAS2, XA2, stride_xa, stride_xs, xa_splits, B2, s2, R2, pid - T2, N0 + N1, M, N2,
                 N_ALL, SPLIT, HAS_BIAS, HAS_LORA, BLOCK_M, BLOCK_N, BLOCK_R, DOT, FP32)


def nf4_group_gemv_fwd(x, items, blocksize: int, blocksize2: int, outs, config: dict | None = None):
    """``outs[i] = x @ W_i.T + bias_i + s_i * xa_i @ B_i.T`` for 2 or 3 projections (see the module docstring);
    returns ``outs``.

    items: per projection ``(packed uint8, (absmax, code, code2, absmax2, offset), n, bias, lora)`` as
    ``nf4_gemv_fwd`` takes them: one blocksize and nesting, a bias on all or none, a LoRA term on all or none (the
    xa views sharing a row stride); outs: (M, N_i) of x's dtype, contiguous; config: tile overrides."""
    m, k = x.shape
    g = len(items)
    if g not in (2, 3):
        raise ValueError(f"the grouped GEMV takes 2 or 3 projections, got {g}")
    for _, _, n, _, _ in items:
        check_gemv(x, n, k, blocksize)
    states = [state_operands(st) for _, st, _, _, _ in items]
    nested = states[0][5]
    has_bias = items[0][3] is not None
    has_lora = items[0][4] is not None
    if any(st[5] != nested for st in states) or any((it[3] is not None) != has_bias for it in items) \
            or any((it[4] is not None) != has_lora for it in items):
        raise ValueError("the grouped GEMV needs one nesting, and a bias and a LoRA term on all projections or none")
    if has_lora and len({xa_strides(it[4][0]) for it in items}) != 1:
        raise ValueError("the grouped GEMV's xa must share their strides (views of one (M, sum R) buffer or of one "
                         "buffer of partials)")
    cfg = gemv_config(m, k, blocksize, config)
    lut = lut_for(states[0][1], x.dtype) if cfg["UNPACK"] == 5 else ""
    code, packed = gemv_operands(cfg["UNPACK"], states[0][1], *[it[0] for it in items])
    ns = [it[2] for it in items]
    ks, split = cfg.pop("KS"), cfg["SPLIT"]
    part = x.new_empty((split, m, sum(ns)), dtype=torch.float32) if split > 1 else x
    slots, ranks = [], []
    for it, p, st, out in zip(items, packed, states, outs):
        absmax, _, code2, absmax2, offset, _ = st
        xa, b, s = it[4] if has_lora else (x, x, 0.0)
        b = b.contiguous() if has_lora else b
        ranks.append(b.shape[1] if has_lora else 0)
        slots.append((p, absmax, code2, absmax2, offset, it[3] if has_bias else x, xa, b, float(s), out, it[2],
                      ranks[-1]))
    if g == 2:
        slots.append(slots[1])
    xa_stride = xa_strides(items[0][4][0]) if has_lora else (0, 0, 1)
    flags = {"HAS_BIAS": has_bias, "HAS_LORA": has_lora, "FP32": x.dtype.itemsize == 4,
             "BLOCK_R": min(64, max(16, next_power_of_2(max(ranks)))), "DOT": cfg["DOT"]}
    tiles = [cdiv(n, cfg["BLOCK_N"]) for n in ns]
    t1, t2 = tiles[0], tiles[0] + tiles[1]
    finish, count = finish_operands(cfg, x, part, sum(tiles))
    launch(_nf4_group_gemv_kernel, (sum(tiles), split), x, x.stride(0), part, count, code, *xa_stride, m, k, ks,
           sum(ns), t1, t2, *[a for slot in slots for a in slot], BLOCKSIZE=blocksize,
           BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested, enable_fp_fusion=False, **flags,
           **{n: v for n, v in cfg.items() if n != "DOT"}, **pdl_options(x), LUT=lut, FINISH=finish)
    if split > 1 and not finish:
        ends = [cdiv(n, EPILOGUE_N) for n in ns]
        launch(_group_epilogue_kernel, (sum(ends),), part, *xa_stride, m, sum(ns), ends[0], ends[0] + ends[1],
               *[a for slot in slots for a in slot[5:]], SPLIT=split, BLOCK_M=cfg["BLOCK_M"],
               BLOCK_N=EPILOGUE_N, enable_fp_fusion=False, **flags, **pdl_options(x))
    return outs
