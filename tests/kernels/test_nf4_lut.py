"""The byte-permute NF4 lookup (``fastllm.kernels.nf4_lut``): its inline assembly run on the CPU by a model of the
PTX instructions it uses (``mov``, ``and``, ``shl``, ``shr``, ``prmt``, ``lop3`` as the PTX manual defines them),
over every byte value in every position of the packed word, against the code table rounded to bf16 and fp16. The
GPU tests compare the compiled permutes with the gathered path bit for bit."""

import re

import pytest
import torch

from fastllm.kernels.nf4_lut import lut_asm

bnb = pytest.importorskip("bitsandbytes")

M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` default mode: bytes 0-3 of a, 4-7 of b; selector nibble i picks output byte i, bit 3 of
    the nibble replicating the picked byte's sign bit."""
    src = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    return sum(((lut >> ((((a >> j) & 1) << 2) | (((b >> j) & 1) << 1) | ((c >> j) & 1))) & 1) << j
               for j in range(32))


def run_asm(asm: str, word: int) -> list[int]:
    """The registers $0-$3 after ``asm`` with $4 = ``word``."""
    regs = {"$4": word}

    def val(tok: str) -> int:
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [t.strip() for t in args.split(",")]
        v = [val(t) for t in src]
        if op == "mov.b32":
            regs[d] = v[0]
        elif op == "and.b32":
            regs[d] = v[0] & v[1]
        elif op == "shl.b32":
            regs[d] = (v[0] << v[1]) & M32
        elif op == "shr.u32":
            regs[d] = v[0] >> v[1]
        elif op == "prmt.b32":
            regs[d] = _prmt(*v)
        elif op == "lop3.b32":
            regs[d] = _lop3(*v)
        else:
            raise AssertionError(f"instruction not modelled: {op}")
    return [regs[f"${i}"] for i in range(4)]


def test_asm_uses_only_the_modelled_instructions():
    ops = {line.split()[0] for line in lut_asm(list(range(16))).splitlines()
           if line.strip() and line.strip() not in "{}" and not line.startswith(".reg")}
    assert ops <= {"mov.b32", "and.b32", "shl.b32", "shr.u32", "prmt.b32", "lop3.b32"}, ops
    assert set(re.findall(r"\$\d+", lut_asm(list(range(16))))) == {f"${i}" for i in range(5)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_permutes_give_the_rounded_codes_of_every_byte(dtype):
    code = bnb.functional.get_4bit_type("nf4", device="cpu")
    bits = (code.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    asm = lut_asm(bits)
    for b in range(256):
        # the byte in each of the four positions, next to other bytes that differ in every nibble
        for pos in range(4):
            others = [(b + 37 * (i + 1)) & 0xFF for i in range(4)]
            others[pos] = b
            word = sum(v << (8 * i) for i, v in enumerate(others))
            out = run_asm(asm, word)
            values = [(out[r] >> (16 * h)) & 0xFFFF for r in range(4) for h in range(2)]
            # k order: byte j's high nibble is element 2j, its low nibble element 2j + 1
            assert values == [bits[(v >> s) & 15] for v in others for s in (4, 0)], (b, pos)
