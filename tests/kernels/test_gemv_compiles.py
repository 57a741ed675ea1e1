"""The decode GEMV kernels compile for a Hopper GPU (sm_90), checked on the CPU: the interpreter runs a kernel's
Python and never type-checks what the compiler does (a constexpr branch that returns is followed by the code after
it, which must agree in type), so a kernel can pass every interpreter test and fail to build on the GPU.

The compiles run in a child process with ``TRITON_INTERPRET=0`` (under the interpreter ``triton.jit`` gives
functions the compiler cannot take); run as a script, this file is that child."""

import itertools
import os
import subprocess
import sys

import pytest

# (kernel, unpack, tensor cores, nested, K splits): the main kernels whole-K and split-K, and the split epilogues
CASES = [("gemv", u, dot, nested, 1) for u, dot, nested in itertools.product((0, 1, 2), (False, True), (True, False))]
CASES += [("glu", u, dot, True, 1) for u, dot in itertools.product((0, 2), (False, True))]
CASES += [("gemv", 3, False, nested, split) for nested, split in ((True, 1), (False, 1), (True, 4))]
CASES += [("glu", 3, False, True, split) for split in (1, 4)]
CASES += [(kind, 3, "rows", True, split) for kind in ("gemv", "glu") for split in (1, 4)]  # 8 rows, CUDA cores
CASES += [(kind, 2, dot, True, 4) for kind, dot in itertools.product(("gemv", "glu", "gemv-end", "glu-end"),
                                                                       (False, True))]


def _compile_all() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastllm.kernels import nf4_gemv as kernels

    def quant(suffix: str, nested: bool, unpack: int) -> dict:
        names = ("P", "A", "C2", "A2", "O") if suffix else ("PACKED", "ABSMAX", "CODE2", "ABSMAX2", "OFFSET")
        types = ("*i32" if unpack == 3 else "*u8", "*u8" if nested else "*fp32", "*fp32", "*fp32", "*fp32")
        return {n + suffix: t for n, t in zip(names, types)}

    failed = 0
    for kind, unpack, dot, nested, split in CASES:
        types = {"X": "*bf16", "stride_x": "i32", "OUT": "*bf16", "stride_o": "i32", "CODE": "*i64" if unpack in (2, 3)
                 else "*fp32", "stride_xa": "i32", "M": "i32", "N": "i32", "K": "i32", "KS": "i32",
                 "PART": "*fp32"}
        rows, dot = dot == "rows", dot is True
        consts = {"BLOCKSIZE": 64, "BLOCKSIZE2": 256, "NESTED": nested, "BLOCK_M": 16 if dot else 8 if rows else 1,
                  "BLOCK_N": 32 if dot else 4, "BLOCK_K": 128 if dot else 1024, "CHUNK": 64, "BLOCK_R": 16,
                  "DOT": dot, "FP32": False, "UNPACK": unpack, "HAS_LORA": True, "SPLIT": split}
        if kind.startswith("gemv"):
            kernel = kernels._nf4_gemv_kernel if kind == "gemv" else kernels._gemv_epilogue_kernel
            types.update(quant("", nested, unpack), BIAS="*bf16", XA="*bf16", Bw="*bf16", s="fp32", R="i32")
            consts.update(HAS_BIAS=True)
        else:
            kernel = kernels._nf4_glu_gemv_kernel if kind == "glu" else kernels._glu_epilogue_kernel
            for p in ("_G", "_U"):
                types.update(quant(p, nested, unpack), **{f"XA{p}": "*bf16", f"B{p}": "*bf16", f"s{p.lower()}": "fp32",
                                                  f"R{p}": "i32"})
            consts.update(GELU=False)
        consts = {n: v for n, v in consts.items() if n in kernel.arg_names}
        signature = {n: types.get(n, "constexpr") for n in kernel.arg_names}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            ok = bool(compiled.asm["cubin"])
        except Exception as err:  # reported per case, all cases tried
            ok, why = False, str(err).strip().splitlines()[-1][:300]
        print(kind, unpack, "rows" if rows else dot, nested, split, "ok" if ok else f"FAILED {why}", flush=True)
        failed += not ok
    return failed


def test_gemv_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith(("gemv", "glu"))]
    assert run.returncode == 0 and len(lines) == len(CASES), run.stdout[-3000:] + run.stderr[-3000:]
    assert all(ln.endswith(" ok") for ln in lines), "\n".join(lines)


if __name__ == "__main__":
    sys.exit(min(_compile_all(), 1))
