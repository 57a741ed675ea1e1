"""NF4 GEMV / small-M GEMM with the weight dequantized in registers, and the LoRA term fused in its epilogue.

For a decode step (``M`` = 1 to 64 token rows) of a QLoRA linear with frozen NF4 weight ``W`` (N, K), adapter
``A`` (R, K), ``B`` (N, R) and scale ``s``::

    y = x @ W.T + bias + s * xa @ B.T          x: (M, K), xa = x @ A.T: (M, R) (computed before, one small GEMM)

(the base output, the rank-R product, its scaling and the sum each rounded to x's dtype, as PEFT's forward rounds
them, so a decode step's logits are eager's up to the base GEMV's summation order)

and, for a gated MLP's gate/up pair (``W_g``, ``W_u`` of one shape, their own adapters), the activation too::

    h = act(x @ W_g.T + s_g * xa_g @ B_g.T) * (x @ W_u.T + s_u * xa_u @ B_u.T)       act: SiLU or GELU-tanh

Each program owns ``BLOCK_N`` output columns (weight rows) and streams their packed bytes over K in ``BLOCK_K``
steps; the packed weight is read once and no dense copy is written (a decode step's bytes are the 4-bit weight's, a
quarter of the dense bf16 weight that dequant + GEMM writes and reads again). The bytes decode through the 16-entry
NF4 table and the per-block absmax (double quant decoded as ``code2[q] * absmax2 + offset``, two fp32 ops rounded as
bitsandbytes does; ``kernels.nf4_tile``). Two ways to multiply:

- one row, and up to ``ROWS_CONFIG["MAX_M"]`` rows: on the CUDA cores in fp32, W never rounded to a 16-bit dtype
  (closer to the exact product than the dense path, within its rounding); one row reads the packed bytes by default,
  the word mode (32-bit words, one accumulator per product summed once after the K loop, ``_nf4_row_words``, each
  decoded weight serving every row) is the several-row mode and a one-row option;
- more rows: on the tensor cores (``tl.dot``, tiles of at least 16 rows, the spare rows masked), each weight
  rounded once to x's dtype (equal to ``dequantize_4bit``'s, as the dense path uses it), fp32 accumulation.

With few output columns (a decode step's q, k, v), ``N / BLOCK_N`` programs each walking all of K keep too few
bytes in flight to reach the memory bandwidth: split K (``STEPS`` per program, ``gemv_config``) gives each program
one K range, its fp32 partial goes to a (SPLIT, M, N) workspace, and a second launch (``_gemv_epilogue_kernel``,
``_glu_epilogue_kernel``) sums the partials in split order (deterministic), then adds the bias and LoRA term.

Needs K a multiple of the quantization blocksize (blocks then never straddle two rows: block of (n, k) is
``n * K / blocksize + k // blocksize``), as bitsandbytes' own GEMV does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2
from .nf4_lut import lut_for
from .nf4_tile import nf4_tile, pair_table
from .pdl import pdl_enter, pdl_options


@triton.jit
def lora_term(acc, OUT, XA, stride_xa, stride_xs, xa_splits, Bw, s, rm, rn, M, N, R, BLOCK_R: tl.constexpr,
              DOT: tl.constexpr, FP32: tl.constexpr):
    """acc + s * xa[rm] @ B[rn].T, rounded as PEFT's forward under autocast rounds it: the base output, the
    product, the scaled product and the sum each to the output's dtype (a decode step then gives eager's logits).
    xa is the sum of ``xa_splits`` slices ``stride_xs`` apart (``kernels.lora_xa``'s fp32 K-split partials, added in
    split order; one slice: xa itself), rounded to the output's dtype; B (any float dtype, e.g. the fp32 masters) is
    rounded to it as it is read."""
    dt = OUT.dtype.element_ty
    lora = tl.zeros(acc.shape, dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        offs = rm[:, None] * stride_xa + rr[None, :]
        ok = (rm < M)[:, None] & (rr < R)[None, :]
        xa = tl.load(XA + offs, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_R)
        for p in range(1, xa_splits):
            xa += tl.load(XA + p * stride_xs + offs, mask=ok, other=0.0)
        xa = xa.to(dt)
        b = tl.load(Bw + rn[:, None] * R + rr[None, :], mask=(rn < N)[:, None] & (rr < R)[None, :],
                    other=0.0).to(dt)  # (BLOCK_N, BLOCK_R)
        if not DOT:  # on the CUDA cores: (BLOCK_M, 1, BLOCK_R) against (1, BLOCK_N, BLOCK_R)
            lora += tl.sum(xa.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
        elif FP32:
            lora += tl.dot(xa, tl.trans(b), input_precision="ieee")
        else:
            lora += tl.dot(xa, tl.trans(b))
    lora = (s * lora.to(dt).to(tl.float32)).to(dt).to(tl.float32)
    return acc.to(dt).to(tl.float32) + lora


@triton.jit
def finish_tile(acc, OUT, stride_o, BIAS, XA, stride_xa, stride_xs, xa_splits, Bw, s, rm, rn, M, N, R,
                HAS_BIAS: tl.constexpr,
            HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr, FP32: tl.constexpr):
    """Store ``out[rm, rn] = acc + bias + s * xa @ B.T`` (acc: the base product, fp32)."""
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        acc = lora_term(acc, OUT, XA, stride_xa, stride_xs, xa_splits, Bw, s, rm, rn, M, N, R, BLOCK_R, DOT, FP32)
    tl.store(OUT + rm[:, None] * stride_o + rn[None, :], acc.to(OUT.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _glu_finish(g, u, OUT, stride_o, XA_G, B_G, s_g, XA_U, B_U, s_u, stride_xa, stride_xs, xa_splits, rm, rn, M, N,
                R_G, R_U,
                HAS_LORA: tl.constexpr, GELU: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
                FP32: tl.constexpr):
    """Store ``out[rm, rn] = act(g + s_g * xa_g @ B_g.T) * (u + s_u * xa_u @ B_u.T)`` (g, u: the base products,
    fp32); act SiLU or, with GELU, GELU-tanh, computed in fp32."""
    if HAS_LORA:
        g = lora_term(g, OUT, XA_G, stride_xa, stride_xs, xa_splits, B_G, s_g, rm, rn, M, N, R_G, BLOCK_R, DOT, FP32)
        u = lora_term(u, OUT, XA_U, stride_xa, stride_xs, xa_splits, B_U, s_u, rm, rn, M, N, R_U, BLOCK_R, DOT, FP32)
    # g, u and act(g) rounded to the output dtype as the unfused MLP holds them (eager's decode logits, not drift)
    g = g.to(OUT.dtype.element_ty).to(tl.float32)
    u = u.to(OUT.dtype.element_ty).to(tl.float32)
    if GELU:
        # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh through exp (no tanh in every Triton's libdevice)
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = g * (1.0 - 1.0 / (tl.exp(2.0 * inner) + 1.0))
    else:
        act = g / (1.0 + tl.exp(-g))
    act = act.to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + rm[:, None] * stride_o + rn[None, :], (act * u).to(OUT.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _store_part(PART, acc, rm, rn, M, N, N_ALL, col):
    """One K split's fp32 partial product into columns ``col + rn`` of its (M, N_ALL) slice of the workspace."""
    tl.store(PART + rm[:, None] * N_ALL + col + rn[None, :], acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _sum_parts(PART, rm, rn, M, N, N_ALL, col, SPLIT: tl.constexpr):
    """The base product as the sum of SPLIT partials, columns ``col + rn`` of (SPLIT, M, N_ALL) fp32, added in
    split order (deterministic)."""
    offs = rm[:, None] * N_ALL + col + rn[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    # ".cg": through L2 only; another program on this SM may hold a line of these columns in L1 from before the
    # other splits wrote them (the finishing program of a neighbouring tile, ``_last_split``)
    acc = tl.load(PART + offs, mask=ok, other=0.0, cache_modifier=".cg")
    for p in range(1, SPLIT):
        acc += tl.load(PART + p * M * N_ALL + offs, mask=ok, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _last_split(COUNTER, SPLIT: tl.constexpr):
    """Whether this program is the last of its output tile's SPLIT K ranges to store its partial; that program then
    finishes the tile (no epilogue launch) and sets the tile's counter back to 0 for the next launch. The barrier
    has every thread's partial stores issued before the release; the acquire orders the finisher's loads after every
    other range's release (the usual split-K semaphore: CUTLASS's, stream-K's)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(COUNTER, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT - 1
    if last:
        tl.store(COUNTER, 0)
    return last


@triton.jit
def gemv_tile(X, stride_x, OUT, stride_o, PART, COUNT, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, BIAS, XA,
              stride_xa, stride_xs, xa_splits, Bw, s, tile, col, M, N, N_ALL, K, KS, R, BLOCKSIZE: tl.constexpr,
              BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
              BLOCK_R: tl.constexpr, DOT: tl.constexpr, FP32: tl.constexpr, UNPACK: tl.constexpr, SPLIT: tl.constexpr,
              LUT: tl.constexpr, FINISH: tl.constexpr):
    """out[m, n] = x[m] . W[n] + bias[n] + s * xa[m] . B[n] for the BLOCK_N columns n of output tile ``tile``;
    with SPLIT > 1, program column j sums K range [j KS, (j + 1) KS) only and stores it to columns ``col + n`` of
    PART[j], (SPLIT, M, N_ALL) fp32 (``col``, ``N_ALL``: where this projection sits among a group's); then
    ``gemv_end`` finishes, in an epilogue launch or, with FINISH, in the last range's program (``_last_split`` on
    ``COUNT``, this launch's tile counter)."""
    rm = tl.arange(0, BLOCK_M)
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = tl.program_id(1) * KS
    acc = nf4_tile(X, stride_x, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rm, rn, M, N, K, k_lo,
                   tl.minimum(k_lo + KS, K), BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, DOT,
                   FP32, UNPACK, LUT)
    if SPLIT == 1:
        finish_tile(acc, OUT, stride_o, BIAS, XA, stride_xa, stride_xs, xa_splits, Bw, s, rm, rn, M, N, R, HAS_BIAS,
                    HAS_LORA, BLOCK_R, DOT, FP32)
    else:
        _store_part(PART + tl.program_id(1) * M * N_ALL, acc, rm, rn, M, N, N_ALL, col)
        if FINISH:
            if _last_split(COUNT, SPLIT):
                finish_tile(_sum_parts(PART, rm, rn, M, N, N_ALL, col, SPLIT), OUT, stride_o, BIAS, XA, stride_xa,
                            stride_xs, xa_splits, Bw, s, rm, rn, M, N, R, HAS_BIAS, HAS_LORA, BLOCK_R, DOT, FP32)


@triton.jit
def gemv_end(PART, OUT, stride_o, BIAS, XA, stride_xa, stride_xs, xa_splits, Bw, s, R, tile, col, M, N, N_ALL,
             SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr, FP32: tl.constexpr):
    """A split-K GEMV's end for output tile ``tile``: the partials summed, bias and LoRA term added, stored."""
    rm = tl.arange(0, BLOCK_M)
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    finish_tile(_sum_parts(PART, rm, rn, M, N, N_ALL, col, SPLIT), OUT, stride_o, BIAS, XA, stride_xa, stride_xs,
                xa_splits, Bw, s, rm, rn, M, N, R, HAS_BIAS, HAS_LORA, BLOCK_R, DOT, FP32)


@triton.jit
def _nf4_gemv_kernel(X, stride_x, OUT, stride_o, PART, COUNT, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, BIAS,
                     XA, stride_xa, stride_xs, xa_splits, Bw, s, M, N, K, KS, R,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
                     FP32: tl.constexpr, UNPACK: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
                     LUT: tl.constexpr, FINISH: tl.constexpr):
    """Program (i, j): output tile i, K range j (``gemv_tile``; the last range or ``_gemv_epilogue_kernel``
    finishes a split)."""
    pdl_enter(PDL)
    gemv_tile(X, stride_x, OUT, stride_o, PART, COUNT + tl.program_id(0), PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET,
              BIAS, XA, stride_xa, stride_xs, xa_splits, Bw, s, tl.program_id(0), 0, M, N, N, K, KS, R, BLOCKSIZE,
              BLOCKSIZE2, NESTED, HAS_BIAS, HAS_LORA, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, BLOCK_R, DOT, FP32, UNPACK,
              SPLIT, LUT, FINISH)


@triton.jit
def _gemv_epilogue_kernel(PART, OUT, stride_o, BIAS, XA, stride_xa, stride_xs, xa_splits, Bw, s, M, N, R,
                          SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr, FP32: tl.constexpr,
                          PDL: tl.constexpr):
    """A split-K GEMV's end (``gemv_end``), program i: output tile i."""
    pdl_enter(PDL)
    gemv_end(PART, OUT, stride_o, BIAS, XA, stride_xa, stride_xs, xa_splits, Bw, s, R, tl.program_id(0), 0, M, N, N,
             SPLIT, HAS_BIAS, HAS_LORA, BLOCK_M, BLOCK_N, BLOCK_R, DOT, FP32)


@triton.jit
def _nf4_glu_gemv_kernel(X, stride_x, OUT, stride_o, PART, COUNT, CODE,
                         P_G, A_G, C2_G, A2_G, O_G, XA_G, B_G, s_g,
                         P_U, A_U, C2_U, A2_U, O_U, XA_U, B_U, s_u,
                         stride_xa, stride_xs, xa_splits, M, N, K, KS, R_G, R_U,
                         BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                         HAS_LORA: tl.constexpr, GELU: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr,
                         DOT: tl.constexpr, FP32: tl.constexpr, UNPACK: tl.constexpr, SPLIT: tl.constexpr,
                         PDL: tl.constexpr, LUT: tl.constexpr, FINISH: tl.constexpr):
    """out[m, n] = act(g[m, n]) * u[m, n], g and u each ``x . W[n] + s * xa . B[n]`` (``_glu_finish``); with
    SPLIT > 1 the K-range partials of g go to PART[j] and of u to PART[SPLIT + j], finished by the last range's
    program (FINISH, ``_last_split``) or ``_glu_epilogue_kernel``."""
    pdl_enter(PDL)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = tl.program_id(1) * KS
    k_hi = tl.minimum(k_lo + KS, K)
    g = nf4_tile(X, stride_x, P_G, A_G, CODE, C2_G, A2_G, O_G, rm, rn, M, N, K, k_lo, k_hi,
                  BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, DOT, FP32, UNPACK, LUT)
    u = nf4_tile(X, stride_x, P_U, A_U, CODE, C2_U, A2_U, O_U, rm, rn, M, N, K, k_lo, k_hi,
                  BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, DOT, FP32, UNPACK, LUT)
    if SPLIT == 1:
        _glu_finish(g, u, OUT, stride_o, XA_G, B_G, s_g, XA_U, B_U, s_u, stride_xa, stride_xs, xa_splits, rm, rn, M, N,
                    R_G, R_U, HAS_LORA, GELU, BLOCK_R, DOT, FP32)
    else:
        _store_part(PART + tl.program_id(1) * M * N, g, rm, rn, M, N, N, 0)
        _store_part(PART + (SPLIT + tl.program_id(1)) * M * N, u, rm, rn, M, N, N, 0)
        if FINISH:
            if _last_split(COUNT + tl.program_id(0), SPLIT):
                _glu_finish(_sum_parts(PART, rm, rn, M, N, N, 0, SPLIT),
                            _sum_parts(PART + SPLIT * M * N, rm, rn, M, N, N, 0, SPLIT), OUT, stride_o, XA_G, B_G, s_g,
                            XA_U, B_U, s_u, stride_xa, stride_xs, xa_splits, rm, rn, M, N, R_G, R_U, HAS_LORA, GELU,
                            BLOCK_R, DOT, FP32)


@triton.jit
def _glu_epilogue_kernel(PART, OUT, stride_o, XA_G, B_G, s_g, XA_U, B_U, s_u, stride_xa, stride_xs, xa_splits, M, N,
                         R_G, R_U, SPLIT: tl.constexpr, HAS_LORA: tl.constexpr, GELU: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
                         FP32: tl.constexpr, PDL: tl.constexpr):
    """A split-K gate/up GEMV's end: each projection's partials summed, LoRA terms, activation, product."""
    pdl_enter(PDL)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = _sum_parts(PART, rm, rn, M, N, N, 0, SPLIT)
    u = _sum_parts(PART + SPLIT * M * N, rm, rn, M, N, N, 0, SPLIT)
    _glu_finish(g, u, OUT, stride_o, XA_G, B_G, s_g, XA_U, B_U, s_u, stride_xa, stride_xs, xa_splits, rm, rn, M, N,
                R_G, R_U, HAS_LORA, GELU, BLOCK_R, DOT, FP32)


# Tile sizes: the fastest of ``fastllm bench generate --sweep`` (CUDA-graph timings over L2-busting weight copies;
# docs/benchmarks.md). One row: the codes by byte permutes (UNPACK 5) on the tensor cores, the row padded to 16, 128
# weight rows a program, one quantization block a step, 3 stages, K split 8 steps a program; batches on the tensor
# cores, 64 weight rows a program, 128-element steps, 8 steps a program. The CUDA cores' several-row mode (32-bit
# words, up to 8 rows' accumulators in registers: ``fastllm bench sass``) lost to the tensor cores at every swept
# row count, so ``MAX_M`` 1 leaves it to the sweep and to explicit overrides.
ROW_CONFIG = {"DOT": True, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "UNPACK": 5, "STEPS": 8}
# a few rows on the CUDA cores (32-bit words, each decoded step serving every row), up to MAX_M rows
ROWS_CONFIG = {"BLOCK_N": 8, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1, "UNPACK": 3, "STEPS": 4, "MAX_M": 1}
DOT_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1, "UNPACK": 0, "STEPS": 8}
MAX_ROWS = 64  # largest M these kernels take (decode batches); more rows go to dequant + GEMM
EPILOGUE_N = 64  # output columns per program of a split-K GEMV's epilogue
COUNTERS = 1 << 14  # per device: one int32 arrival counter per output tile of a FINISH launch
_COUNTERS: dict = {}


def tile_counters(x, tiles: int):
    """The device's arrival counters for a FINISH launch of ``tiles`` output tiles (int32, zero between launches:
    each tile's finishing program resets its own), or None where the launch must take the epilogue instead: more
    tiles than counters, or no counters yet while a CUDA graph is being captured (a capture does not run the zero
    fill, and the buffer must outlive the graph). Launches on one device share them: kernels run one after another
    on a stream (with PDL too: a kernel waits for its predecessor's grid before touching memory), so two GEMVs on
    two streams at once would need their own."""
    if tiles > COUNTERS:
        return None
    count = _COUNTERS.get(x.device)
    if count is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        count = _COUNTERS[x.device] = torch.zeros(COUNTERS, dtype=torch.int32, device=x.device)
    return count


def finish_operands(cfg: dict, x, part, tiles: int) -> tuple:
    """(FINISH, counters) for a launch of ``tiles`` output tiles: ``cfg``'s FINISH taken out of it, turned off
    where ``tile_counters`` has none (the counters' stand-in is then ``part``, never read)."""
    count = tile_counters(x, tiles) if cfg.pop("FINISH") else None
    return count is not None, part if count is None else count


def gemv_config(m: int, k: int, blocksize: int, override: dict | None = None) -> dict:
    """The one place that maps a problem to its tile sizes and launch options. Paths: one row (``ROW_CONFIG``),
    up to ``ROWS_CONFIG["MAX_M"]`` rows on the CUDA cores (``ROWS_CONFIG``, 32-bit words), more on the tensor
    cores (``DOT_CONFIG``, ``DOT``); ``override`` (the sweep, tests) replaces any of ``BLOCK_N, BLOCK_K, UNPACK,
    STEPS, num_warps, num_stages`` and may pick the path (``DOT``). BLOCK_K is capped at the largest power of two
    dividing K (no tail to mask; K is a multiple of the blocksize and of 32); ``STEPS`` BLOCK_K steps per program
    along K (0: all of K, one launch; else K splits into ``SPLIT`` ranges of ``KS`` elements, each a program
    column, and an epilogue launch sums them: more programs, more bytes in flight, for the few output columns of
    a decode step); ``FINISH``: the last K range of each output tile sums them instead of an epilogue launch
    (``tile_counters``)."""
    override = override or {}
    base = ROW_CONFIG if m == 1 else ROWS_CONFIG if m <= ROWS_CONFIG["MAX_M"] else DOT_CONFIG
    dot = override.get("DOT", base.get("DOT", base is DOT_CONFIG))
    if m > 1 and "DOT" in override and dot != (base is DOT_CONFIG):
        base = DOT_CONFIG if dot else ROWS_CONFIG
    cfg = {**base, **override}
    unpack = cfg["UNPACK"]
    # UNPACK 5 runs on the tensor cores, one quantization block a step (its absmax scales the block's dot)
    block_k = min(cfg["BLOCK_K"], k & -k, blocksize if unpack == 5 and dot else k)
    steps = k // block_k
    per = min(cfg.get("STEPS", 0) or steps, steps)
    split = cdiv(steps, per)
    # words are the CUDA cores' only several-row mode; the one-row modes (words, lanes) are bytes on the tensor cores;
    # the permutes (5) are a tensor-core mode (bytes on the CUDA cores)
    unpack = 3 if not dot and m > 1 else 0 if dot and unpack in (3, 4) or not dot and unpack == 5 else unpack
    return {"BLOCK_M": max(16, next_power_of_2(m)) if dot else next_power_of_2(m), "BLOCK_N": cfg["BLOCK_N"],
            "BLOCK_K": block_k, "CHUNK": min(blocksize, block_k), "DOT": dot, "UNPACK": unpack, "SPLIT": split,
            "KS": k if split == 1 else per * block_k, "FINISH": bool(cfg.get("FINISH")) and split > 1,
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def check_gemv(x, n: int, k: int, blocksize: int) -> None:
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be (M, {k}) with unit stride along K, got {tuple(x.shape)}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"the NF4 GEMV takes 1 to {MAX_ROWS} rows, got {x.shape[0]}")
    if k % blocksize or k % 32:
        raise ValueError(f"the NF4 GEMV needs in_features ({k}) a multiple of the blocksize ({blocksize}) and of 32")


def gemv_operands(unpack: int, code, *packed) -> tuple:
    """The code table and packed weights as the ``UNPACK`` mode reads them: the pair table (2), int32 words (3)
    (for 5 the table stays as it is; ``lut_for`` turns it into the permutes' immediates)."""
    if unpack == 2:
        code = pair_table(code)
    if unpack == 3:
        if any(p.numel() % 4 or p.storage_offset() % 4 or not p.is_contiguous() for p in packed):
            raise ValueError("UNPACK=3 reads the packed weight as int32 words: it must be contiguous and 4-byte "
                             "aligned")
        packed = tuple(p.reshape(-1).view(torch.int32) for p in packed)
    return code, packed[0] if len(packed) == 1 else packed


def xa_strides(xa) -> tuple:
    """(row stride, split stride, splits) of a LoRA ``xa`` operand: (M, R) in x's dtype, or the (SPLIT, M, R) fp32
    partials of ``kernels.lora_xa`` (a column slice for one adapter of a group), which the LoRA term adds up."""
    if xa.dim() == 2:
        return xa.stride(0), 0, 1
    if xa.dim() != 3 or xa.stride(2) != 1:
        raise ValueError(f"xa must be (M, R) or (SPLIT, M, R) with unit stride along R, got {tuple(xa.shape)}")
    return xa.stride(1), xa.stride(0), xa.shape[0]


def state_operands(st):
    """(absmax, code, code2, absmax2, offset) as kernel pointers (the absmax standing in where not nested)."""
    absmax, code, code2, absmax2, offset = st
    nested = code2 is not None
    return (absmax, code, code2 if nested else code, absmax2 if nested else absmax, offset if nested else absmax,
            nested)


def nf4_gemv_fwd(x, packed, state, n: int, blocksize: int, blocksize2: int, out, bias=None, lora=None,
                 config: dict | None = None):
    """``out = x @ W.T + bias + s * xa @ B.T`` (see the module docstring) and return ``out``.

    x: (M, K) with M <= MAX_ROWS; packed: the (N * K / 2) bytes as uint8; state: ``(absmax, code, code2,
    absmax2, offset)`` (code2 None unless nested); out: (M, N) of x's dtype, unit stride along N;
    bias: (N,) or None; lora: ``(xa, B (N, R) contiguous, s)`` or None, xa (M, R) in x's dtype or the (SPLIT, M, R)
    fp32 partials of ``kernels.lora_xa`` (``xa_strides``), B in any float dtype (rounded to x's as it is read);
    config: tile overrides (``gemv_config``).
    """
    m, k = x.shape
    check_gemv(x, n, k, blocksize)
    absmax, code, code2, absmax2, offset, nested = state_operands(state)
    cfg = gemv_config(m, k, blocksize, config)
    lut = lut_for(code, x.dtype) if cfg["UNPACK"] == 5 else ""
    code, packed = gemv_operands(cfg["UNPACK"], code, packed)
    xa, b, s = lora if lora is not None else (x, x, 0.0)
    r = b.shape[1] if lora is not None else 0
    bias = bias if bias is not None else x
    ks, split = cfg.pop("KS"), cfg["SPLIT"]
    pdl = pdl_options(x)
    part = x.new_empty((split, m, n), dtype=torch.float32) if split > 1 else out
    tiles = cdiv(n, cfg["BLOCK_N"])
    finish, count = finish_operands(cfg, x, part, tiles)
    epilogue = {"HAS_BIAS": bias is not x, "HAS_LORA": lora is not None, "FP32": x.dtype.itemsize == 4,
                "BLOCK_R": min(64, max(16, next_power_of_2(r)))}
    launch(_nf4_gemv_kernel, (tiles, split),
           x, x.stride(0), out, out.stride(0), part, count, packed, absmax, code, code2, absmax2, offset,
           bias, xa, *xa_strides(xa), b, float(s), m, n, k, ks, r,
           BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested, enable_fp_fusion=False,
           **epilogue, **cfg, **pdl, LUT=lut, FINISH=finish)
    if split > 1 and not finish:
        launch(_gemv_epilogue_kernel, (cdiv(n, EPILOGUE_N),), part, out, out.stride(0), bias, xa, *xa_strides(xa),
               b, float(s), m, n, r, SPLIT=split, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=EPILOGUE_N, DOT=cfg["DOT"],
               enable_fp_fusion=False, **epilogue, **pdl)
    return out


def nf4_glu_gemv_fwd(x, gate, up, n: int, blocksize: int, blocksize2: int, out, gelu: bool = False,
                     config: dict | None = None):
    """``out = act(gate(x)) * up(x)`` with each projection ``(packed, state, lora)`` as for ``nf4_gemv_fwd`` (both
    with a LoRA term or neither; one blocksize and nesting); out: (M, N) of x's dtype."""
    m, k = x.shape
    check_gemv(x, n, k, blocksize)
    (pg, sg, lg), (pu, su, lu) = gate, up
    if (lg is None) != (lu is None):
        raise ValueError("the fused gate/up GEMV takes a LoRA term on both projections or on neither")
    ag, code, c2g, a2g, og, nested = state_operands(sg)
    au, _, c2u, a2u, ou, nested_u = state_operands(su)
    if nested != nested_u:
        raise ValueError("the fused gate/up GEMV needs both weights nested or neither")
    cfg = gemv_config(m, k, blocksize, config)
    lut = lut_for(code, x.dtype) if cfg["UNPACK"] == 5 else ""
    code, (pg, pu) = gemv_operands(cfg["UNPACK"], code, pg, pu)
    xag, bg, s_g = lg if lg is not None else (x, x, 0.0)
    xau, bu, s_u = lu if lu is not None else (x, x, 0.0)
    if xa_strides(xag) != xa_strides(xau):
        raise ValueError("gate's and up's xa must share their strides (views of one (M, R_g + R_u) buffer or of one "
                         "buffer of partials)")
    rg, ru = (bg.shape[1], bu.shape[1]) if lg is not None else (0, 0)
    ks, split = cfg.pop("KS"), cfg["SPLIT"]
    pdl = pdl_options(x)
    part = x.new_empty((2 * split, m, n), dtype=torch.float32) if split > 1 else out
    tiles = cdiv(n, cfg["BLOCK_N"])
    finish, count = finish_operands(cfg, x, part, tiles)
    epilogue = {"HAS_LORA": lg is not None, "GELU": gelu, "FP32": x.dtype.itemsize == 4,
                "BLOCK_R": min(64, max(16, next_power_of_2(max(rg, ru))))}
    lora_args = (xag, bg, float(s_g), xau, bu, float(s_u), *xa_strides(xag))
    launch(_nf4_glu_gemv_kernel, (tiles, split),
           x, x.stride(0), out, out.stride(0), part, count, code,
           pg, ag, c2g, a2g, og, xag, bg, float(s_g),
           pu, au, c2u, a2u, ou, xau, bu, float(s_u),
           *xa_strides(xag), m, n, k, ks, rg, ru,
           BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested, enable_fp_fusion=False,
           **epilogue, **cfg, **pdl, LUT=lut, FINISH=finish)
    if split > 1 and not finish:
        launch(_glu_epilogue_kernel, (cdiv(n, EPILOGUE_N),), part, out, out.stride(0), *lora_args, m, n, rg, ru,
               SPLIT=split, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=EPILOGUE_N, DOT=cfg["DOT"], enable_fp_fusion=False,
               **epilogue, **pdl)
    return out
