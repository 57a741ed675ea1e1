"""bitsandbytes NF4 dequantization in one Triton kernel (double quant included).

bitsandbytes stores a weight ``W`` of ``n = numel`` elements as ``ceil(n / 2)`` packed bytes; byte
``b`` holds element ``2b`` in its high nibble and ``2b + 1`` in its low nibble. Element ``e`` belongs
to quantization block ``k = e // blocksize`` and decodes as::

    W[e] = code[nibble(e)] * absmax[k]                         (fp32 product, rounded once to out dtype)

With double quant (``quant_state.nested``) the per-block ``absmax`` is itself 8-bit quantized in
blocks of ``blocksize2`` (256) with the 256-entry table ``state2.code``::

    absmax[k] = state2.code[qabsmax[k]] * state2.absmax[k // blocksize2] + offset

Both products and the ``+ offset`` are done in fp32 in exactly bitsandbytes' order (its CUDA path
runs them as separate kernels, so nothing is fused: the kernel is compiled with fp fusion off, or
``a * b + c`` would become one FMA and differ in the last bit). The result is then bit-identical to
``bitsandbytes.functional.dequantize_4bit``.

One launch reads the packed bytes, the 8-bit absmax and the second-level state and writes the output;
no absmax buffer is materialised. Each program owns ``TILE`` consecutive packed bytes laid out as a
(ROWS, COLS) tile with ``COLS = min(blocksize / 2, TILE)``, so a tile row never straddles two blocks
and the absmax chain is computed once per row (not per element) and broadcast.

Reference: Dettmers et al. 2023, "QLoRA" (NF4, double quantization); bitsandbytes ``kDequantizeBlockwise``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch


@triton.jit
def _dequant_tile(PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, OUT, tile, n_elements, n_bytes,
                  BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                  ROWS: tl.constexpr, COLS: tl.constexpr):
    """Tile ``tile`` of one weight: out[2b + j] = code[nib_j(packed[b])] * absmax[(2b) // BLOCKSIZE]."""
    HALF: tl.constexpr = BLOCKSIZE // 2  # packed bytes per quantization block
    # 64-bit only in the scalar tile base (a 128256x4096 weight has 2^29 elements); per-element
    # offsets stay 32-bit, which halves the integer work of the address maths.
    base = tile.to(tl.int64) * (ROWS * COLS)
    left_bytes = tl.minimum(n_bytes - base, ROWS * COLS).to(tl.int32)
    left_elems = tl.minimum(n_elements - 2 * base, 2 * ROWS * COLS).to(tl.int32)

    row = tl.arange(0, ROWS) * COLS  # (ROWS,) first byte of each tile row, relative to base
    byte = row[:, None] + tl.arange(0, COLS)[None, :]  # (ROWS, COLS)
    q = tl.load(PACKED + base + byte, mask=byte < left_bytes, other=0).to(tl.int32)

    # A row never straddles two blocks: COLS divides HALF, or the tile lies inside one block.
    blk = base // HALF + row // HALF  # (ROWS,) quantization block of each tile row
    row_ok = row < left_bytes
    if NESTED:
        qa = tl.load(ABSMAX + blk, mask=row_ok, other=0).to(tl.int32)
        a2 = tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=row_ok, other=0.0)
        # Product and sum as two rounded fp32 ops (fp fusion is off at launch), like bitsandbytes.
        scale = tl.load(CODE2 + qa) * a2 + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + blk, mask=row_ok, other=0.0)
    scale = scale[:, None]  # (ROWS, 1)

    # The 16-entry NF4 table is 64 bytes: the gathers hit L1 and stay one wavefront per warp.
    hi = tl.load(CODE + (q >> 4)) * scale
    lo = tl.load(CODE + (q & 15)) * scale
    vals = tl.reshape(tl.join(hi, lo), (ROWS, 2 * COLS))  # (ROWS, 2*COLS): byte b -> 2b, 2b+1
    elem = 2 * row[:, None] + tl.arange(0, 2 * COLS)[None, :]
    # Compute stays fp32 and is cast once on store (the interpreter mishandles bf16 arithmetic).
    tl.store(OUT + 2 * base + elem, vals.to(OUT.dtype.element_ty), mask=elem < left_elems)


@triton.jit
def _nf4_dequant_fwd_kernel(PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, OUT, n_elements, n_bytes,
                            BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                            ROWS: tl.constexpr, COLS: tl.constexpr):
    """One weight, one tile per program."""
    _dequant_tile(PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, OUT, tl.program_id(0), n_elements, n_bytes,
                  BLOCKSIZE, BLOCKSIZE2, NESTED, ROWS, COLS)


@triton.jit
def _nf4_dequant_parts_kernel(P0, A0, C0, D0, S0, O0, n0, b0, t0,
                              P1, A1, C1, D1, S1, O1, n1, b1, t1,
                              P2, A2, C2, D2, S2, O2, n2, b2,
                              OUT, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                              ROWS: tl.constexpr, COLS: tl.constexpr, PARTS: tl.constexpr):
    """Two or three weights stacked along dim 0 of OUT in one launch: programs [0, t0) take part 0,
    [t0, t0 + t1) part 1, the rest part 2 (parts of a layer sharing one input: q/k/v, gate/up)."""
    pid = tl.program_id(0)
    if pid < t0:
        _dequant_tile(P0, A0, C0, D0, S0, O0, OUT, pid, n0, b0, BLOCKSIZE, BLOCKSIZE2, NESTED, ROWS, COLS)
    elif PARTS == 2 or pid < t0 + t1:
        _dequant_tile(P1, A1, C1, D1, S1, O1, OUT + n0, pid - t0, n1, b1,
                      BLOCKSIZE, BLOCKSIZE2, NESTED, ROWS, COLS)
    else:
        _dequant_tile(P2, A2, C2, D2, S2, O2, OUT + n0 + n1, pid - t0 - t1, n2, b2,
                      BLOCKSIZE, BLOCKSIZE2, NESTED, ROWS, COLS)


# Bytes per program and warps, from ``fastllm bench dequant --sweep`` (docs/benchmarks.md): 4096-byte tiles
# with 4 warps are best for large weights; small weights do better with smaller tiles as long as the grid keeps
# enough programs in flight (~15 per SM) to hide memory latency. Larger tiles with fewer warps spill registers.
_TILE_BYTES = 4096
_MIN_TILE_BYTES = 1024
_NUM_WARPS = 4
_MIN_PROGRAMS = 2048


@functools.lru_cache(maxsize=1024)
def launch_config(n_bytes: int, blocksize: int, tile_bytes: int | None = None,
                  num_warps: int | None = None) -> tuple[int, int, int, int]:
    """The one place that maps a problem to (ROWS, COLS, num_warps, grid).

    Cached: small weights are host-bound (most of a call is Triton's Python launch path), so per-call
    Python work matters.
    """
    tile = tile_bytes or _TILE_BYTES
    if tile_bytes is None:
        while tile > _MIN_TILE_BYTES and cdiv(n_bytes, tile) < _MIN_PROGRAMS:
            tile //= 2
    cols = min(blocksize // 2, tile)
    rows = tile // cols
    warps = num_warps or _NUM_WARPS
    return rows, cols, warps, cdiv(n_bytes, tile)


def nf4_dequant_fwd(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    out: torch.Tensor, code2: torch.Tensor | None = None, absmax2: torch.Tensor | None = None,
                    offset: torch.Tensor | None = None, blocksize2: int = 256, *,
                    tile_bytes: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Dequantize into ``out`` (any shape, contiguous, bf16/fp16/fp32) and return it.

    packed: ``ceil(out.numel() / 2)`` bytes (any storage dtype, viewed as uint8); absmax: fp32
    (nblocks,) or, when ``code2`` is given (nested), uint8 (nblocks,) with fp32 ``code2`` (256,),
    ``absmax2`` (ceil(nblocks / blocksize2),) and a one-element fp32 ``offset`` tensor (read on the
    device: no host sync).
    """
    if not out.is_contiguous():
        raise ValueError("nf4_dequant_fwd writes a contiguous output")
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 2, got {blocksize}")
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # bnb's quant_storage may be bf16/fp32 etc. (FSDP)
    n = out.numel()
    n_bytes = (n + 1) // 2
    if packed.numel() < n_bytes:
        raise ValueError(f"packed has {packed.numel()} bytes, {n_bytes} needed for {n} elements")
    if n == 0:
        return out
    nested = code2 is not None
    if nested and (absmax2 is None or offset is None):
        raise ValueError("nested NF4 needs code2, absmax2 and offset")
    rows, cols, warps, grid = launch_config(n_bytes, blocksize, tile_bytes, num_warps)
    launch(
        _nf4_dequant_fwd_kernel, (grid,),
        packed, absmax, code, code2 if nested else code, absmax2 if nested else absmax,
        offset if nested else absmax, out, n, n_bytes,
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested,
        ROWS=rows, COLS=cols, num_warps=warps, enable_fp_fusion=False)
    return out


def nf4_dequant_parts(parts, blocksize: int, out: torch.Tensor, blocksize2: int = 256) -> torch.Tensor:
    """Dequantize two or three weights into consecutive rows of ``out`` in one launch and return ``out``.

    parts: ``(packed, absmax, code, code2, absmax2, offset, numel)`` per weight, as for ``nf4_dequant_fwd``
    (all nested or none, one blocksize); out: contiguous, ``sum(numel)`` elements, part i starting at element
    ``numel_0 + .. + numel_{i-1}``. Each part's element count must be even (whole packed bytes), which holds
    for any weight with an even in_features.
    """
    if not 2 <= len(parts) <= 3:
        raise ValueError(f"nf4_dequant_parts takes 2 or 3 weights, got {len(parts)}")
    if not out.is_contiguous() or out.numel() != sum(p[6] for p in parts):
        raise ValueError("nf4_dequant_parts writes a contiguous output holding all parts")
    nested = parts[0][3] is not None
    args = []
    tiles = []
    rows, cols, warps, _ = launch_config(out.numel() // 2, blocksize)  # one tile shape for all parts
    for packed, absmax, code, code2, absmax2, offset, n in parts:
        if n % 2:
            raise ValueError("nf4_dequant_parts needs an even element count per part")
        if (code2 is not None) != nested:
            raise ValueError("nf4_dequant_parts needs all parts nested or none")
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        nb = n // 2
        t = cdiv(nb, rows * cols)
        tiles.append(t)
        args.append((packed, absmax, code, code2 if nested else code, absmax2 if nested else absmax,
                     offset if nested else absmax, n, nb, t))
    if len(args) == 2:
        args.append(args[1])  # part 2 is never reached with PARTS=2
    flat = [*args[0], *args[1], *args[2][:-1]]
    launch(
        _nf4_dequant_parts_kernel, (sum(tiles),),
        *flat, out, BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested,
        ROWS=rows, COLS=cols, PARTS=len(parts), num_warps=warps, enable_fp_fusion=False)
    return out
