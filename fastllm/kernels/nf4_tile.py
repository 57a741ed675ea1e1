"""The product of a token-row tile and an NF4 weight tile, the weight decoded in registers: the ways the decode GEMV
(``kernels.nf4_gemv``) multiplies.

``nf4_tile`` gives ``acc[m, j] = sum_{k_lo <= k < k_hi} x[m, k] W[rn_j, k]`` in fp32 for a (BLOCK_M, BLOCK_N) tile:
one row (or a few) on the CUDA cores in fp32 (``_nf4_row``: bytes, 32-bit words or lanes, see ``UNPACK``), more rows
on the tensor cores (``_nf4_dot``). The bytes decode through the 16-entry NF4 table (or the 256-entry pair table,
``pair_table``) and the per-block absmax (double quant decoded as ``code2[q] * absmax2 + offset``, two fp32 ops
rounded as bitsandbytes does). Blocks never straddle two weight rows (K a multiple of the blocksize): the block of
(n, k) is ``n * K / blocksize + k // blocksize``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4_lut import nf4_codes16


@triton.jit
def _absmax(ABSMAX, CODE2, ABSMAX2, OFFSET, blk, ok, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """The fp32 absmax of quantization blocks ``blk`` (any shape), double quant decoded as bitsandbytes does."""
    # one return after a constexpr branch: the compiler visits code after a returning branch too
    if NESTED:
        qa = tl.load(ABSMAX + blk, mask=ok, other=0).to(tl.int32)
        scale = tl.load(CODE2 + qa) * tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=ok, other=0.0)
        absmax = scale + tl.load(OFFSET)  # a separate rounded add (fp fusion is off at launch), as bnb
    else:
        absmax = tl.load(ABSMAX + blk, mask=ok, other=0.0).to(tl.float32)
    return absmax


@triton.jit
def _pair(PAIRS, q):
    """The two NF4 values of bytes ``q`` (any shape), high nibble's first, from one 64-bit load a byte: ``PAIRS``
    (256 int64, ``pair_table``) holds byte b's values as the fp32 bits of ``code[b >> 4]`` (high word) and
    ``code[b & 15]`` (low word)."""
    pair = tl.load(PAIRS + q)
    return (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True), pair.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _nf4_row(X, stride_x, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rn, M, N, K, k_lo, k_hi,
             BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, UNPACK: tl.constexpr):
    """acc[m, j] = sum_{k_lo <= k < k_hi} x[m, k] W[rn_j, k] in fp32 on the CUDA cores: (BLOCK_M, BLOCK_N); rows
    m >= M repeat row M - 1 (masked at the store). BLOCK_M > 1 only with ``UNPACK`` 3.

    The packed tile is read as (BLOCK_N, NB, HB) bytes, NB quantization blocks (or block chunks) of HB bytes per
    row, so the absmax broadcasts over the last axis with no reshape; the block's absmax multiplies its partial
    sum (``absmax * sum(code[q] * x)``), one multiply per block instead of one per weight. ``UNPACK`` 0: each byte
    once, its two nibbles against x's even and odd elements (strided x loads); 1: the tile read per element
    (BLOCK_N, NB, CHUNK), each element shifting its own nibble out of its byte (each byte loaded twice, from the
    same cache line) against contiguous x; 2: each byte once, both its values from one 64-bit load of the pair
    table (``CODE`` is then ``pair_table(code)``), x read contiguously and split into even and odd elements;
    3: ``_nf4_row_words``; 4 (lanes): as 0, with no reduction inside the K loop (``_nf4_row_bytes``)."""
    if UNPACK == 3:  # one return (see _absmax)
        acc = _nf4_row_words(X, stride_x, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rn, M, N, K, k_lo, k_hi,
                             BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK)
    else:
        acc = _nf4_row_bytes(X, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rn, N, K, k_lo, k_hi, BLOCKSIZE,
                             BLOCKSIZE2, NESTED, BLOCK_N, BLOCK_K, CHUNK, UNPACK)[None, :]
    return acc


@triton.jit
def _nf4_row_words(X, stride_x, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rn, M, N, K, k_lo, k_hi,
                   BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """``_nf4_row`` over 32-bit words (``PACKED`` as int32: 8 weights a word, byte j of word w holding elements
    8w + 2j (high nibble) and 8w + 2j + 1 (low nibble)), both values of a byte from one load of the pair table
    (``PAIRS``, ``pair_table``), the next step's words loaded before this step's are decoded (one step's bytes
    in flight while the other is computed), x read contiguously and split into a byte's even and odd elements.

    Every product goes into its own fp32 accumulator (acc[m, n, c, w, j] += absmax * code * x: an FMUL per
    weight, shared by the BLOCK_M rows, and an FMA per product), summed across the tile once after the last
    step: a sum over the tile every step costs a cross-thread reduction (shuffles, shared memory) per step and
    row, which made the GEMV instruction-bound at about 20 instructions a product (``bench generate --sass``)."""
    WC: tl.constexpr = CHUNK // 8        # words of one block chunk
    NB: tl.constexpr = BLOCK_K // CHUNK  # block chunks per row per step
    n_ok = rn < N
    row_words = (rn.to(tl.int64) * (K // 8))[:, None, None]  # (BLOCK_N, 1, 1)
    row_blocks = (rn * (K // BLOCKSIZE))[:, None]            # (BLOCK_N, 1)
    chunk = tl.arange(0, NB)
    word = chunk[:, None] * WC + tl.arange(0, WC)[None, :]  # (NB, WC) word offsets within a step
    byte_shift = (tl.arange(0, 4) * 8)[None, None, None, :]  # (1, 1, 1, 4)
    # (NB, WC, 4, 2) element offsets within a step: byte j's even and odd elements
    pair = (tl.arange(0, 4) * 2)[:, None] + tl.arange(0, 2)[None, :]  # (4, 2)
    elem = word[:, :, None, None] * 8 + pair[None, None, :, :]
    x_rows = (tl.minimum(tl.arange(0, BLOCK_M), M - 1) * stride_x)[:, None, None, None, None, None]
    nxt = tl.load(PACKED + row_words + (k_lo // 8 + word)[None, :, :], mask=n_ok[:, None, None], other=0)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_N, NB, WC, 4), dtype=tl.float32)
    acc_lo = tl.zeros((BLOCK_M, BLOCK_N, NB, WC, 4), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = nxt
        more = rn < tl.where(k0 + BLOCK_K < k_hi, N, 0)  # rows with a next step in this range
        nxt = tl.load(PACKED + row_words + ((k0 + BLOCK_K) // 8 + word)[None, :, :], mask=more[:, None, None],
                      other=0)
        blk = row_blocks + ((k0 + chunk * CHUNK) // BLOCKSIZE)[None, :]
        scale = _absmax(ABSMAX, CODE2, ABSMAX2, OFFSET, blk, n_ok[:, None], BLOCKSIZE2, NESTED)[:, :, None, None]
        wu = w.to(tl.uint32, bitcast=True)[:, :, :, None]  # logical shifts: no sign to clear
        hi = tl.load(CODE + ((wu >> (byte_shift + 4)) & 15))  # (BLOCK_N, NB, WC, 4)
        lo = tl.load(CODE + ((wu >> byte_shift) & 15))
        x_hi, x_lo = tl.split(tl.load(X + x_rows + (k0 + elem)[None, None, :, :, :, :]).to(tl.float32))
        acc_hi = tl.fma((hi * scale)[None, :, :, :, :], x_hi, acc_hi)
        acc_lo = tl.fma((lo * scale)[None, :, :, :, :], x_lo, acc_lo)
    return tl.sum(tl.sum(tl.sum(acc_hi + acc_lo, axis=4), axis=3), axis=2)


@triton.jit
def _nf4_row_bytes(X, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rn, N, K, k_lo, k_hi,
                   BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, UNPACK: tl.constexpr):
    """``_nf4_row`` over bytes (``UNPACK`` 0 to 2, and 4).

    ``UNPACK`` 4 (lanes) reads as 0 but sums nothing inside the K loop: each byte's pair ``code[hi] x[2b] +
    code[lo] x[2b + 1]``, times its block's absmax, goes into its own fp32 lane of a (BLOCK_N, NB, HB) accumulator,
    summed across the tile once after the last step (the others sum the tile every step: cross-thread shuffles per
    step and row). One FMUL more a byte; the summation order differs, within fp32 rounding."""
    HB: tl.constexpr = CHUNK // 2        # bytes of one block chunk
    NB: tl.constexpr = BLOCK_K // CHUNK  # block chunks per row per step
    LANES: tl.constexpr = UNPACK == 4
    n_ok = rn < N
    row_bytes = (rn.to(tl.int64) * (K // 2))[:, None, None]  # (BLOCK_N, 1, 1)
    row_blocks = (rn * (K // BLOCKSIZE))[:, None]             # (BLOCK_N, 1)
    chunk = tl.arange(0, NB)
    byte = chunk[:, None] * HB + tl.arange(0, HB)[None, :]   # (NB, HB) byte offsets within a step
    elem = chunk[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]  # (NB, CHUNK) element offsets within a step
    if LANES:
        acc = tl.zeros((BLOCK_N, NB, HB), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        blk = row_blocks + ((k0 + chunk * CHUNK) // BLOCKSIZE)[None, :]
        if UNPACK == 0 or LANES:
            bb = k0 // 2 + byte
            q = tl.load(PACKED + row_bytes + bb[None, :, :], mask=n_ok[:, None, None], other=0).to(tl.int32)
            x_hi = tl.load(X + 2 * bb).to(tl.float32)[None, :, :]  # element 2b pairs with byte b's high nibble
            x_lo = tl.load(X + 2 * bb + 1).to(tl.float32)[None, :, :]
            pairs = tl.load(CODE + (q >> 4)) * x_hi + tl.load(CODE + (q & 15)) * x_lo  # (BLOCK_N, NB, HB)
            if LANES:
                scale = _absmax(ABSMAX, CODE2, ABSMAX2, OFFSET, blk, n_ok[:, None], BLOCKSIZE2, NESTED)
                acc = tl.fma(pairs, scale[:, :, None], acc)
            else:
                part = tl.sum(pairs, axis=2)  # (BLOCK_N, NB)
        elif UNPACK == 1:
            kk = k0 + elem
            q = tl.load(PACKED + row_bytes + (kk // 2)[None, :, :], mask=n_ok[:, None, None], other=0).to(tl.int32)
            nib = (q >> (4 - 4 * (kk & 1))[None, :, :]) & 15  # even elements in the high nibble
            part = tl.sum(tl.load(CODE + nib) * tl.load(X + kk).to(tl.float32)[None, :, :], axis=2)
        else:
            bb = k0 // 2 + byte
            q = tl.load(PACKED + row_bytes + bb[None, :, :], mask=n_ok[:, None, None], other=0).to(tl.int32)
            hi, lo = _pair(CODE, q)
            x_hi, x_lo = tl.split(tl.reshape(tl.load(X + k0 + elem).to(tl.float32), (NB, HB, 2)))
            part = tl.sum(hi * x_hi[None, :, :] + lo * x_lo[None, :, :], axis=2)
        if not LANES:
            acc += tl.sum(part * _absmax(ABSMAX, CODE2, ABSMAX2, OFFSET, blk, n_ok[:, None], BLOCKSIZE2, NESTED),
                          axis=1)
    if LANES:
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
    else:
        total = acc
    return total


@triton.jit
def nf4_tile(X, stride_x, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rm, rn, M, N, K, k_lo, k_hi,
              BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
              DOT: tl.constexpr, FP32: tl.constexpr, UNPACK: tl.constexpr, LUT: tl.constexpr):
    """acc[m, j] = sum_{k_lo <= k < k_hi} x[rm_m, k] * W[rn_j, k] in fp32: (BLOCK_M, BLOCK_N). BLOCK_K divides K
    and k_lo.

    ``DOT``: tensor cores (``tl.dot``, at least 16 rows of x, the spare ones masked), W rounded to x's dtype as the
    dense dequant writes it; else one row (BLOCK_M = 1) on the CUDA cores (``_nf4_row``). ``UNPACK`` picks how the
    nibbles come out of the bytes (see ``_nf4_row``): 0 both nibbles of a byte, joined into k order; 1 each element
    shifted out of its own byte, no join; 2 as 0, both values of a byte from the pair table; 3 and 4 (one row's
    words and lanes) as 0; 5 (tensor cores only, one quantization block a step) the codes rounded to x's dtype by
    byte permutes (``kernels.nf4_lut``, the inline assembly ``LUT``; empty: gathered), each block's partial product
    scaled by its absmax after the dot."""
    if not DOT:  # one return (see _absmax)
        acc = _nf4_row(X, stride_x, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rn, M, N, K, k_lo, k_hi,
                       BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, UNPACK)
    else:
        acc = _nf4_dot(X, stride_x, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rm, rn, M, N, K, k_lo, k_hi,
                       BLOCKSIZE,
                       BLOCKSIZE2, NESTED, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, FP32, UNPACK, LUT)
    return acc


@triton.jit
def _nf4_dot(X, stride_x, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rm, rn, M, N, K, k_lo, k_hi,
             BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
             FP32: tl.constexpr, UNPACK: tl.constexpr, LUT: tl.constexpr):
    """``nf4_tile`` on the tensor cores."""
    NCH: tl.constexpr = BLOCK_K // CHUNK  # absmax entries per row per step (CHUNK = min(BLOCKSIZE, BLOCK_K))
    m_ok = rm < M
    n_ok = rn < N
    row_bytes = (rn.to(tl.int64) * (K // 2))[:, None]  # (BLOCK_N, 1) first packed byte of each weight row
    row_blocks = (rn * (K // BLOCKSIZE))[:, None]      # (BLOCK_N, 1) first quantization block of each row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * stride_x + kk[None, :], mask=m_ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
        if UNPACK == 0:
            bb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            q = tl.load(PACKED + row_bytes + bb[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
            # byte b holds element 2b in its high nibble and 2b + 1 in its low one
            w = tl.reshape(tl.join(tl.load(CODE + (q >> 4)), tl.load(CODE + (q & 15))), (BLOCK_N, BLOCK_K))
        elif UNPACK == 1:
            q = tl.load(PACKED + row_bytes + (kk // 2)[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
            w = tl.load(CODE + ((q >> (4 - 4 * (kk & 1))[None, :]) & 15))
        elif UNPACK == 5:  # the bytes as loaded (uint8: four to a register for the permutes)
            bb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            q = tl.load(PACKED + row_bytes + bb[None, :], mask=n_ok[:, None], other=0)
            w = nf4_codes16(q, CODE, LUT, x, BLOCK_N, BLOCK_K // 2)
        else:
            bb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            q = tl.load(PACKED + row_bytes + bb[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
            w = tl.reshape(tl.join(*_pair(CODE, q)), (BLOCK_N, BLOCK_K))
        blk = row_blocks + ((k0 + tl.arange(0, NCH) * CHUNK) // BLOCKSIZE)[None, :]  # (BLOCK_N, NCH)
        scale = _absmax(ABSMAX, CODE2, ABSMAX2, OFFSET, blk, n_ok[:, None], BLOCKSIZE2, NESTED)
        if UNPACK != 5:  # 5 scales the block's partial product instead (one block a step: BLOCK_K == CHUNK)
            if NCH == 1:  # the step lies inside one block per row: a broadcast, no reshape
                w = w * scale
            else:
                w = tl.reshape(tl.reshape(w, (BLOCK_N, NCH, CHUNK)) * scale[:, :, None], (BLOCK_N, BLOCK_K))
            w = w.to(X.dtype.element_ty)  # W rounded to x's dtype once, as the dense dequant writes it
        if FP32:
            part = tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(w))
        if UNPACK == 5:
            acc = tl.fma(part, tl.reshape(scale, (1, BLOCK_N)), acc)  # one instruction (fp fusion is off)
        else:
            acc += part
    return acc


_PAIRS: dict = {}


def pair_table(code):
    """(256,) int64: byte b's two NF4 values as fp32 bits, ``code[b >> 4]`` in the high word and ``code[b & 15]``
    in the low one (``UNPACK=2``: one load a byte instead of two). Made once per code tensor and kept."""
    key = (code.device, code.data_ptr())
    if key not in _PAIRS:
        bits = code.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        b = torch.arange(256, device=code.device)
        _PAIRS[key] = (bits[b >> 4] << 32) | bits[b & 15]
    return _PAIRS[key]
