"""The decode GEMV kernels (and the decode step's other small kernels) compile for a Hopper GPU (sm_90), checked on
the CPU: the interpreter runs a kernel's Python and never type-checks what the compiler does (a constexpr branch
that returns is followed by the code after it, which must agree in type), so a kernel can pass every interpreter
test and fail to build on the GPU.

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
CASES += [(kind, 4, False, nested, split) for kind in ("gemv", "glu") for nested, split in ((True, 1), (False, 4))]
CASES += [("group", 4, False, True, 4)]
CASES += [("glu", 3, False, True, split) for split in (1, 4)]
CASES += [(kind, 3, "rows", True, split) for kind in ("gemv", "glu") for split in (1, 4)]  # 8 rows, CUDA cores
CASES += [(kind, 2, dot, True, 4) for kind, dot in itertools.product(("gemv", "glu", "gemv-end", "glu-end"),
                                                                       (False, True))]
CASES += [("group", 3, False, True, split) for split in (1, 4)] + [("group", 3, "rows", True, 4)]
CASES += [("group", 2, True, False, 4), ("group-end", 3, False, True, 4), ("group-end", 2, True, True, 4)]
# the LoRA term over ``kernels.lora_xa``'s fp32 partials and fp32 B (a decode step's operands)
PARTIALS = [("gemv", 0, False, True, 1), ("gemv-end", 0, False, True, 4), ("gemv-end", 2, True, True, 4),
            ("glu-end", 0, False, True, 4), ("glu", 2, True, True, 1), ("group-end", 3, False, True, 4)]
# the codes by byte permutes (``kernels.nf4_lut``: inline assembly), tensor cores, one block a step
LUT = [(kind, 5, True, nested, split)
       for kind, nested, split in (("gemv", True, 4), ("gemv", False, 1), ("glu", True, 1), ("group", True, 4))]
# launched with programmatic dependent launch (``kernels.pdl``): each kernel's grid-dependency prologue
PDL = [(kind, 0, False, True, 4) for kind in ("gemv", "gemv-end", "glu", "glu-end", "group", "group-end")]
# split K finished by each tile's last K range (an arrival counter, no epilogue launch)
FINISH = [(kind, unpack, dot, True, 4) for kind in ("gemv", "glu", "group") for unpack, dot in ((0, False), (2, True))]


def _compile_all() -> int:
    from fastllm.bench.sass import compile_sm90, signature
    from fastllm.kernels import nf4_gemv as kernels
    from fastllm.kernels import nf4_group_gemv as group

    failed = 0
    for i, (kind, unpack, dot, nested, split) in enumerate(CASES + PARTIALS + PDL + LUT + FINISH):
        rows, dot = dot == "rows", dot is True
        cfg = {"BLOCK_M": 16 if dot else 8 if rows else 1, "BLOCK_N": 32 if dot else 4, "BLOCK_K": 128 if dot else 1024,
               "CHUNK": 64, "DOT": dot, "UNPACK": unpack, "SPLIT": split,
               "PDL": len(CASES) + len(PARTIALS) <= i < len(CASES) + len(PARTIALS) + len(PDL),
               "FINISH": i >= len(CASES) + len(PARTIALS) + len(PDL) + len(LUT)}
        if unpack == 5:
            cfg["BLOCK_K"] = 64  # one quantization block a step
        kernel = {"gemv": kernels._nf4_gemv_kernel, "gemv-end": kernels._gemv_epilogue_kernel,
                  "glu": kernels._nf4_glu_gemv_kernel, "glu-end": kernels._glu_epilogue_kernel,
                  "group": group._nf4_group_gemv_kernel, "group-end": group._group_epilogue_kernel}[kind]
        try:
            compiled = compile_sm90(kernel, *signature(kernel, cfg, nested, bias=True, partials=i >= len(CASES)))
            ok = bool(compiled.asm["cubin"]) and (not cfg["PDL"] or "griddepcontrol" in compiled.asm["ptx"]) \
                and (unpack != 5 or "prmt.b32" in compiled.asm["ptx"]) \
                and (not cfg["FINISH"] or "atom.global.gpu.acq_rel" in compiled.asm["ptx"])
        except Exception as err:  # reported per case, all cases tried
            ok, why = False, str(err).strip().splitlines()[-1][:300]
        print(kind, unpack, "rows" if rows else dot, nested, split, "ok" if ok else f"FAILED {why}", flush=True)
        failed += not ok
    return failed + _compile_others()


# the decode step's other kernels: (kernel module, name, pointer types, constexprs)
OTHERS = [("cast_cat", "_cast_cat_kernel", {"OUT": "*bf16", "S0": "*fp32", "S2": "*bf16"}, {"N_SRC": n, "BLOCK": 1024})
          for n in (1, 3, 8)]
OTHERS += [("lora_add", "_lora_add_kernel", {"Y": "*bf16", "XA": "*bf16", "Bw": "*bf16", "s": "fp32"},
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": 16, "DOT": dot, "FP32": False})
           for bm, bn, dot in ((1, 128, False), (16, 16, False), (64, 64, True))]
OTHERS += [("lora_xa", "_lora_xa_kernel", {"X": "*bf16", "PART": "*fp32", "A0": "*fp32", "A1": "*fp32", "A2": "*fp32"},
            {"BLOCK_M": bm, "BLOCK_R": br, "BLOCK_K": 128, "DOT": dot, "FP32": False, "PDL": pdl})
           for bm, br, dot, pdl in ((1, 16, False, False), (4, 16, False, True), (32, 16, True, False),
                                    (16, 64, True, True))]


def _compile_others() -> int:
    import importlib

    from fastllm.bench.sass import compile_sm90

    failed = 0
    for module, name, pointers, consts in OTHERS:
        kernel = getattr(importlib.import_module(f"fastllm.kernels.{module}"), name)
        sig = {n: "constexpr" if n in consts else pointers.get(n, "*fp32" if n[0] == "S" and n[1:].isdigit()
                                                                 else "i32") for n in kernel.arg_names}
        try:
            ok = bool(compile_sm90(kernel, sig, consts).asm["cubin"])
        except Exception as err:
            ok, why = False, str(err).strip().splitlines()[-1][:300]
        print("other", module, consts, "ok" if ok else f"FAILED {why}", flush=True)
        failed += not ok
    return failed


def test_gemv_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith(("gemv", "glu", "group", "other"))]
    expected = len(CASES) + len(PARTIALS) + len(PDL) + len(LUT) + len(FINISH) + len(OTHERS)
    assert run.returncode == 0 and len(lines) == expected, run.stdout[-3000:] + run.stderr[-3000:]
    assert all(ln.endswith(" ok") for ln in lines), "\n".join(lines)


if __name__ == "__main__":
    sys.exit(min(_compile_all(), 1))
