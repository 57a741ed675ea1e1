"""NF4 GEMV / small-M GEMM with the weight dequantized in registers, and the LoRA term fused in its epilogue.

For a decode step (``M`` = 1 to 64 token rows) of a QLoRA linear with frozen NF4 weight ``W`` (N, K), adapter
``A`` (R, K), ``B`` (N, R) and scale ``s``::

    y = x @ W.T + bias + s * xa @ B.T          x: (M, K), xa = x @ A.T: (M, R) (computed before, one small GEMM)

(the base output, the rank-R product, its scaling and the sum each rounded to x's dtype, as PEFT's forward rounds
them, so a decode step's logits are eager's up to the base GEMV's summation order)

and, for a gated MLP's gate/up pair (``W_g``, ``W_u`` of one shape, their own adapters), the activation too::

    h = act(x @ W_g.T + s_g * xa_g @ B_g.T) * (x @ W_u.T + s_u * xa_u @ B_u.T)       act: SiLU or GELU-tanh

Each program owns ``BLOCK_N`` output columns (weight rows) and streams their packed bytes over K in ``BLOCK_K``
steps: the bytes decode through the 16-entry NF4 table, the per-block absmax (double quant decoded as
``code2[q] * absmax2 + offset``, two fp32 ops rounded as bitsandbytes does) scales them in fp32, the product is
rounded once to x's dtype (so ``W`` equals ``dequantize_4bit``'s, as the dequant + GEMM path uses it) and
``tl.dot`` accumulates in fp32. The packed weight is read once and no dense copy is written: a decode step's
bytes are the 4-bit weight's, a quarter of the dense bf16 weight that dequant + GEMM writes and reads again.
Rows of x beyond M are masked (tensor-core tiles are at least 16 rows; the spare rows cost compute, not bytes).

Needs K a multiple of the quantization blocksize (blocks then never straddle two rows: block of (n, k) is
``n * K / blocksize + k // blocksize``), as bitsandbytes' own GEMV does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2


@triton.jit
def _nf4_tile(X, stride_x, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rm, rn, M, N, K,
              BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
              FP32: tl.constexpr):
    """acc[m, j] = sum_k x[rm_m, k] * W[rn_j, k] in fp32: (BLOCK_M, BLOCK_N). BLOCK_K divides K."""
    NCH: tl.constexpr = BLOCK_K // CHUNK  # absmax entries per row per step (CHUNK = min(BLOCKSIZE, BLOCK_K))
    m_ok = rm < M
    n_ok = rn < N
    row_bytes = (rn.to(tl.int64) * (K // 2))[:, None]  # (BLOCK_N, 1) first packed byte of each weight row
    row_blocks = (rn * (K // BLOCKSIZE))[:, None]      # (BLOCK_N, 1) first quantization block of each row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * stride_x + kk[None, :], mask=m_ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
        bb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        q = tl.load(PACKED + row_bytes + bb[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
        # byte b holds element 2b in its high nibble and 2b + 1 in its low one
        w = tl.reshape(tl.join(tl.load(CODE + (q >> 4)), tl.load(CODE + (q & 15))), (BLOCK_N, BLOCK_K))
        blk = row_blocks + ((k0 + tl.arange(0, NCH) * CHUNK) // BLOCKSIZE)[None, :]  # (BLOCK_N, NCH)
        if NESTED:
            qa = tl.load(ABSMAX + blk, mask=n_ok[:, None], other=0).to(tl.int32)
            scale = tl.load(CODE2 + qa) * tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=n_ok[:, None], other=0.0)
            scale = scale + tl.load(OFFSET)  # a separate rounded add (fp fusion is off at launch), as bnb
        else:
            scale = tl.load(ABSMAX + blk, mask=n_ok[:, None], other=0.0)
        w = tl.reshape(tl.reshape(w, (BLOCK_N, NCH, CHUNK)) * scale[:, :, None], (BLOCK_N, BLOCK_K))
        w = w.to(X.dtype.element_ty)  # W rounded to x's dtype once, as the dense dequant writes it
        if FP32:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def _lora_term(acc, XA, stride_xa, Bw, s, rm, rn, M, N, R, BLOCK_R: tl.constexpr, FP32: tl.constexpr):
    """acc + s * xa[rm] @ B[rn].T, rounded as PEFT's forward under autocast rounds it: the base output, the
    product, the scaled product and the sum each to x's dtype (a decode step then gives eager's logits)."""
    dt = XA.dtype.element_ty
    lora = tl.zeros(acc.shape, dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        xa = tl.load(XA + rm[:, None] * stride_xa + rr[None, :], mask=(rm < M)[:, None] & (rr < R)[None, :],
                     other=0.0)  # (BLOCK_M, BLOCK_R)
        b = tl.load(Bw + rn[:, None] * R + rr[None, :], mask=(rn < N)[:, None] & (rr < R)[None, :],
                    other=0.0)  # (BLOCK_N, BLOCK_R)
        if FP32:
            lora += tl.dot(xa, tl.trans(b), input_precision="ieee")
        else:
            lora += tl.dot(xa, tl.trans(b))
    lora = (s * lora.to(dt).to(tl.float32)).to(dt).to(tl.float32)
    return acc.to(dt).to(tl.float32) + lora


@triton.jit
def _nf4_gemv_kernel(X, stride_x, OUT, stride_o, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, BIAS,
                     XA, stride_xa, Bw, s, M, N, K, R,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, FP32: tl.constexpr):
    """out[m, n] = x[m] . W[n] + bias[n] + s * xa[m] . B[n]  for BLOCK_N columns n per program."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _nf4_tile(X, stride_x, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rm, rn, M, N, K,
                    BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, FP32)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        acc = _lora_term(acc, XA, stride_xa, Bw, s, rm, rn, M, N, R, BLOCK_R, FP32)
    tl.store(OUT + rm[:, None] * stride_o + rn[None, :], acc.to(OUT.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _nf4_glu_gemv_kernel(X, stride_x, OUT, stride_o, CODE,
                         P_G, A_G, C2_G, A2_G, O_G, XA_G, B_G, s_g,
                         P_U, A_U, C2_U, A2_U, O_U, XA_U, B_U, s_u,
                         stride_xa, M, N, K, R_G, R_U,
                         BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                         HAS_LORA: tl.constexpr, GELU: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr,
                         FP32: tl.constexpr):
    """out[m, n] = act(g[m, n]) * u[m, n], g and u each ``x . W[n] + s * xa . B[n]``; act SiLU or, with GELU,
    GELU-tanh; computed in fp32."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = _nf4_tile(X, stride_x, P_G, A_G, CODE, C2_G, A2_G, O_G, rm, rn, M, N, K,
                  BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, FP32)
    u = _nf4_tile(X, stride_x, P_U, A_U, CODE, C2_U, A2_U, O_U, rm, rn, M, N, K,
                  BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, FP32)
    if HAS_LORA:
        g = _lora_term(g, XA_G, stride_xa, B_G, s_g, rm, rn, M, N, R_G, BLOCK_R, FP32)
        u = _lora_term(u, XA_U, stride_xa, B_U, s_u, rm, rn, M, N, R_U, BLOCK_R, FP32)
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


# Tile sizes: a program streams BLOCK_N weight rows; 16 rows keep a 4096-row weight at 256 programs (about two per
# SM on an H200) at batch 1, and BLOCK_K = 512 elements puts 4 KiB of packed bytes in flight per program per step.
_BLOCK_N = 16
_MAX_BLOCK_K = 512
_NUM_WARPS = 4
_NUM_STAGES = 3
MAX_ROWS = 64  # largest M these kernels take (decode batches); more rows go to dequant + GEMM


def gemv_config(m: int, k: int, blocksize: int) -> tuple[int, int, int, int]:
    """The one place that maps a problem to (BLOCK_M, BLOCK_N, BLOCK_K, CHUNK): BLOCK_K is the largest power of two
    up to ``_MAX_BLOCK_K`` dividing K (no tail to mask; K is a multiple of the blocksize)."""
    block_k = min(_MAX_BLOCK_K, k & -k)
    return max(16, next_power_of_2(m)), _BLOCK_N, block_k, min(blocksize, block_k)


def check_gemv(x, n: int, k: int, blocksize: int) -> None:
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be (M, {k}) with unit stride along K, got {tuple(x.shape)}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"the NF4 GEMV takes 1 to {MAX_ROWS} rows, got {x.shape[0]}")
    if k % blocksize or k % 32:
        raise ValueError(f"the NF4 GEMV needs in_features ({k}) a multiple of the blocksize ({blocksize}) and of 32")


def _state(st):
    """(absmax, code, code2, absmax2, offset) as kernel pointers (the absmax standing in where not nested)."""
    absmax, code, code2, absmax2, offset = st
    nested = code2 is not None
    return (absmax, code, code2 if nested else code, absmax2 if nested else absmax, offset if nested else absmax,
            nested)


def nf4_gemv_fwd(x, packed, state, n: int, blocksize: int, blocksize2: int, out, bias=None, lora=None):
    """``out = x @ W.T + bias + s * xa @ B.T`` (see the module docstring) and return ``out``.

    x: (M, K) with M <= MAX_ROWS; packed: the (N * K / 2) bytes as uint8; state: ``(absmax, code, code2,
    absmax2, offset)`` (code2 None unless nested); out: (M, N) of x's dtype, unit stride along N;
    bias: (N,) or None; lora: ``(xa (M, R), B (N, R) contiguous, s)`` or None (xa, B in x's dtype).
    """
    m, k = x.shape
    check_gemv(x, n, k, blocksize)
    absmax, code, code2, absmax2, offset, nested = _state(state)
    bm, bn, bk, chunk = gemv_config(m, k, blocksize)
    xa, b, s = lora if lora is not None else (x, x, 0.0)
    r = b.shape[1] if lora is not None else 0
    launch(_nf4_gemv_kernel, (cdiv(n, bn),),
           x, x.stride(0), out, out.stride(0), packed, absmax, code, code2, absmax2, offset,
           bias if bias is not None else x, xa, xa.stride(0), b, float(s), m, n, k, r,
           BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested, HAS_BIAS=bias is not None,
           HAS_LORA=lora is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, CHUNK=chunk,
           BLOCK_R=min(64, max(16, next_power_of_2(r))), FP32=x.dtype.itemsize == 4,
           num_warps=_NUM_WARPS, num_stages=_NUM_STAGES, enable_fp_fusion=False)
    return out


def nf4_glu_gemv_fwd(x, gate, up, n: int, blocksize: int, blocksize2: int, out, gelu: bool = False):
    """``out = act(gate(x)) * up(x)`` with each projection ``(packed, state, lora)`` as for ``nf4_gemv_fwd`` (both
    with a LoRA term or neither; one blocksize and nesting); out: (M, N) of x's dtype."""
    m, k = x.shape
    check_gemv(x, n, k, blocksize)
    (pg, sg, lg), (pu, su, lu) = gate, up
    if (lg is None) != (lu is None):
        raise ValueError("the fused gate/up GEMV takes a LoRA term on both projections or on neither")
    ag, code, c2g, a2g, og, nested = _state(sg)
    au, _, c2u, a2u, ou, nested_u = _state(su)
    if nested != nested_u:
        raise ValueError("the fused gate/up GEMV needs both weights nested or neither")
    bm, bn, bk, chunk = gemv_config(m, k, blocksize)
    xag, bg, s_g = lg if lg is not None else (x, x, 0.0)
    xau, bu, s_u = lu if lu is not None else (x, x, 0.0)
    if xag.stride(0) != xau.stride(0):
        raise ValueError("gate's and up's xa must share a row stride (views of one (M, R_g + R_u) buffer)")
    rg, ru = (bg.shape[1], bu.shape[1]) if lg is not None else (0, 0)
    launch(_nf4_glu_gemv_kernel, (cdiv(n, bn),),
           x, x.stride(0), out, out.stride(0), code,
           pg, ag, c2g, a2g, og, xag, bg, float(s_g),
           pu, au, c2u, a2u, ou, xau, bu, float(s_u),
           xag.stride(0), m, n, k, rg, ru,
           BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested, HAS_LORA=lg is not None,
           GELU=gelu, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, CHUNK=chunk,
           BLOCK_R=min(64, max(16, next_power_of_2(max(rg, ru)))), FP32=x.dtype.itemsize == 4,
           num_warps=_NUM_WARPS, num_stages=_NUM_STAGES, enable_fp_fusion=False)
    return out
