"""NF4 codes to 16-bit floats by byte permutes in registers, not memory gathers (the decode GEMV's ``UNPACK`` 5).

The other modes look each nibble up in the 16-entry code table in memory: per weight an address, a load from L1
and the nibble's shifts, about 6 of the GEMV's 9-10 instructions a weight (``fastllm bench sass``), and the loads
queue behind each other in the load/store unit. Here the table lives in eight 32-bit immediates (the low and the
high byte of each code's 16-bit value, entries 0-7 and 8-15 apart) and ``prmt`` (PTX byte permute) indexes them:
one ``prmt`` looks up four nibbles of one byte plane among eight entries. For four packed bytes (eight weights)::

    m  = per nibble 0xFF if it is >= 8 else 0x00     (prmt's sign-replicate mode on 0x80 bytes, a shift, a lop3)
    L  = m ? prmt(L8..15, n & 7) : prmt(L0..7, n & 7)    low bytes (two prmt, one lop3)
    H  = the same for the high bytes
    out = prmt(L, H) interleaved into 16-bit values    (one prmt per two values)

about 25 instructions for eight weights, no memory access. The values are the codes rounded to the 16-bit dtype
(bf16 or fp16); the GEMV then multiplies on the tensor cores and scales each quantization block's partial sum by
its fp32 absmax (``kernels.nf4_tile._nf4_dot``).

GPU only: the Triton interpreter runs no inline assembly. There ``nf4_codes16`` gathers from the table in memory
and rounds to the dtype, the same values: interpreter tests cover everything around the permutes, the permutes'
logic is checked on the CPU against their PTX semantics (``tests/kernels/test_nf4_lut.py``), and GPU tests compare
the two paths bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LUTS: dict = {}

# one half: 4 nibbles (2 bytes) in the low 16 bits of {raw} (with the sign-mode bit) and {sel} (without it)
_HALF = """
prmt.b32 m, k80, k80, {raw};
shl.b32 t, m, 1;
lop3.b32 m, m, t, k7f, 0xE4;
prmt.b32 a, l0, l1, {sel};
prmt.b32 b, l2, l3, {sel};
lop3.b32 l, b, a, m, 0xE4;
prmt.b32 a, h0, h1, {sel};
prmt.b32 b, h2, h3, {sel};
lop3.b32 h, b, a, m, 0xE4;
prmt.b32 {hi}, l, h, 0x7351;
prmt.b32 {lo}, l, h, 0x6240;"""


def _words(planes: list[int]) -> list[int]:
    """Four little-endian 32-bit words of 16 bytes."""
    return [sum(planes[4 * w + i] << (8 * i) for i in range(4)) for w in range(4)]


def lut_asm(values: list[int]) -> str:
    """The inline assembly that maps four packed NF4 bytes (``$4``) to their values' 16-bit patterns ``values``
    (16 ints): ``$0, $1`` the high nibbles' values of bytes 0-1 and 2-3 (each register two values, the lower byte's
    first), ``$2, $3`` the low nibbles'."""
    lo = _words([v & 0xFF for v in values])
    hi = _words([(v >> 8) & 0xFF for v in values])
    consts = [("k80", 0x80808080), ("k7f", 0x7F7F7F7F)] + [(f"l{i}", w) for i, w in enumerate(lo)] \
        + [(f"h{i}", w) for i, w in enumerate(hi)]
    body = ["{", ".reg .b32 s, r1, s1, m, t, a, b, l, h, k80, k7f, l0, l1, l2, l3, h0, h1, h2, h3;"]
    body += [f"mov.b32 {name}, 0x{value:08X};" for name, value in consts]
    body += ["and.b32 s, $4, 0x77777777;", "shr.u32 r1, $4, 16;", "shr.u32 s1, s, 16;"]
    body += [_HALF.format(raw="$4", sel="s", hi="$0", lo="$2"), _HALF.format(raw="r1", sel="s1", hi="$1", lo="$3")]
    return "\n".join(body + ["}"])


def lut_for(code: torch.Tensor, dtype: torch.dtype) -> str:
    """``lut_asm`` for the code table ``code`` (16 fp32 values) rounded to ``dtype`` (bf16 or fp16; "" for any other
    dtype and on the interpreter, where ``nf4_codes16`` gathers). Made once per code tensor and dtype (reading the
    table to the host synchronises once: call it outside CUDA graph captures first, as a decode step's warm-up does)."""
    if dtype not in (torch.bfloat16, torch.float16) or not code.is_cuda:
        return ""
    key = (code.device, code.data_ptr(), dtype)
    if key not in _LUTS:
        bits = code.float().to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
        _LUTS[key] = lut_asm(bits.tolist())
    return _LUTS[key]


@triton.jit
def nf4_codes16(q, CODE, LUT: tl.constexpr, like):
    """(high nibbles' values, low nibbles' values) of the uint8 bytes ``q`` (any shape), in the dtype of the tensor
    ``like`` (the 16-bit dtype ``LUT`` was made for, or any dtype with ``LUT`` empty: gathered from ``CODE``, fp32,
    and rounded)."""
    dt = like.dtype
    if LUT == "":  # one return after the branch (see nf4_tile._absmax)
        hi = tl.load(CODE + (q >> 4).to(tl.int32)).to(dt)
        lo = tl.load(CODE + (q & 15).to(tl.int32)).to(dt)
    else:
        hi, lo = tl.inline_asm_elementwise(LUT, "=r,=r,=r,=r,r", [q], dtype=(dt, dt), is_pure=True, pack=4)
    return hi, lo
