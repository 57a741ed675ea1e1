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

# one half: 4 nibbles (2 bytes) in the low 16 bits of {sel} (sign-mode bits cleared) and their 0x00 / 0xFF mask {m}
_HALF = """
prmt.b32 a, l0, l1, {sel};
prmt.b32 b, l2, l3, {sel};
lop3.b32 l, b, a, {m}, 0xE4;
prmt.b32 a, h0, h1, {sel};
prmt.b32 b, h2, h3, {sel};
lop3.b32 h, b, a, {m}, 0xE4;
prmt.b32 {even}, l, h, 0x4051;
prmt.b32 {odd}, l, h, 0x6273;"""


def _words(planes: list[int]) -> list[int]:
    """Four little-endian 32-bit words of 16 bytes."""
    return [sum(planes[4 * w + i] << (8 * i) for i in range(4)) for w in range(4)]


def lut_asm(values: list[int]) -> str:
    """The inline assembly that maps four packed NF4 bytes (``$4``) to the 16-bit patterns ``values`` (16 ints) of
    their eight codes, in k order: ``$0, $1`` elements 0-1 and 2-3 (byte 0's high nibble, its low nibble, byte 1's
    high and low nibbles), ``$2, $3`` elements 4-7 (bytes 2 and 3); each register two values, the first in its low
    half.

    The selectors are the word's nibbles in the order prmt reads them (byte 0's low nibble first), so each half's
    two output permutes also swap every byte's pair into k order. The masks come from the nibbles' top bits with
    prmt's sign-replicate mode: the high nibbles' from the bytes' sign bits, the low nibbles' from the word shifted
    left by 4. (ptxas keeps the table words in uniform registers and copies one into a register per permute: about
    one instruction a weight. Passing them in as loaded operands instead made it worse, ``fastllm bench sass``.)"""
    lo = _words([v & 0xFF for v in values])
    hi = _words([(v >> 8) & 0xFF for v in values])
    consts = [(f"l{i}", w) for i, w in enumerate(lo)] + [(f"h{i}", w) for i, w in enumerate(hi)]
    body = ["{", ".reg .b32 s, s1, t, m0, m1, a, b, l, h, l0, l1, l2, l3, h0, h1, h2, h3;"]
    body += [f"mov.b32 {name}, 0x{value:08X};" for name, value in consts]
    body += ["and.b32 s, $4, 0x77777777;", "shr.u32 s1, s, 16;", "shl.b32 t, $4, 4;",
             # output byte j's mask: the sign of the byte holding nibble j's top bit (t: low nibbles, $4: high)
             "prmt.b32 m0, $4, t, 0x9D8C;", "prmt.b32 m1, $4, t, 0xBFAE;"]
    body += [_HALF.format(sel="s", m="m0", even="$0", odd="$1"), _HALF.format(sel="s1", m="m1", even="$2", odd="$3")]
    return "\n".join(body + ["}"])


def code_bits(code: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """The 16-bit patterns of the code table ``code`` rounded to ``dtype`` (bf16 or fp16), as ints."""
    return (code.float().to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()


def lut_for(code: torch.Tensor, dtype: torch.dtype) -> str:
    """``lut_asm`` for the code table ``code`` (16 fp32 values) rounded to ``dtype`` (bf16 or fp16; "" for any other
    dtype and off CUDA (the interpreter), where ``nf4_codes16`` gathers). Made once per code tensor and dtype
    (reading the table to the host synchronises once: call it outside CUDA graph captures first, as a decode step's
    warm-up does)."""
    if dtype not in (torch.bfloat16, torch.float16) or not code.is_cuda:
        return ""
    key = (code.device, code.data_ptr(), dtype)
    if key not in _LUTS:
        _LUTS[key] = lut_asm(code_bits(code, dtype))
    return _LUTS[key]


@triton.jit
def nf4_codes16(q, CODE, LUT: tl.constexpr, like, ROWS: tl.constexpr, BYTES: tl.constexpr):
    """The (ROWS, 2 * BYTES) weights of the packed uint8 bytes ``q`` (ROWS, BYTES) in k order (byte b: elements 2b
    from its high nibble, 2b + 1 from its low one), in the dtype of the tensor ``like``: by ``LUT`` (made for that
    16-bit dtype), or with ``LUT`` empty gathered from ``CODE`` (fp32) and rounded
    to it. The permutes give each group of four bytes' eight values as two outputs of four (``lut_asm``), put back
    in order here."""
    dt = like.dtype
    if LUT == "":  # one return after the branch (see nf4_tile._absmax)
        hi = tl.load(CODE + (q >> 4).to(tl.int32)).to(dt)
        lo = tl.load(CODE + (q & 15).to(tl.int32)).to(dt)
        w = tl.reshape(tl.join(hi, lo), (ROWS, 2 * BYTES))
    else:
        first, second = tl.inline_asm_elementwise(LUT, "=r,=r,=r,=r,r", [q], dtype=(dt, dt), is_pure=True, pack=4)
        # first[4g + i] is element 8g + i of the group, second[4g + i] element 8g + 4 + i
        pair = tl.join(tl.reshape(first, (ROWS, BYTES // 4, 4)), tl.reshape(second, (ROWS, BYTES // 4, 4)))
        w = tl.reshape(tl.permute(pair, (0, 1, 3, 2)), (ROWS, 2 * BYTES))
    return w
