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
    from fastllm.bench.sass import compile_sm90, signature
    from fastllm.kernels import nf4_gemv as kernels

    failed = 0
    for kind, unpack, dot, nested, split in CASES:
        rows, dot = dot == "rows", dot is True
        cfg = {"BLOCK_M": 16 if dot else 8 if rows else 1, "BLOCK_N": 32 if dot else 4, "BLOCK_K": 128 if dot else 1024,
               "CHUNK": 64, "DOT": dot, "UNPACK": unpack, "SPLIT": split}
        kernel = {"gemv": kernels._nf4_gemv_kernel, "gemv-end": kernels._gemv_epilogue_kernel,
                  "glu": kernels._nf4_glu_gemv_kernel, "glu-end": kernels._glu_epilogue_kernel}[kind]
        try:
            compiled = compile_sm90(kernel, *signature(kernel, cfg, nested, bias=True))
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
