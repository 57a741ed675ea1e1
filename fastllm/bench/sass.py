"""fastllm bench sass: the decode GEMV's machine code for a Hopper GPU (sm_90), read on any machine, no GPU needed.

Each configuration is compiled the way a launch compiles it (``kernels.nf4_gemv.gemv_config``; pointers and the
ints a decode step passes as multiples of 16 marked divisible by 16, as Triton specialises them), disassembled
with Triton's bundled ``nvdisasm``, and its K loop (the body of the backward branch) counted by instruction:
per weight of the tile and per product (weight x token row). A loop that needs more instructions a weight than
the GPU can issue in the time it reads half a byte is bound by issuing them; fewer instructions do not make it
memory-bound by themselves (latency, occupancy and the load pattern decide that; docs/benchmarks.md has a mode
with fewer instructions that measured slower), so the counts guide, a GPU run decides. Shared-memory traffic
(``STS``, ``LDS``, ``BAR``) and shuffles (``SHFL``) inside the loop are layout conversions and reductions.
Registers come from ``cuobjdump -res-usage``.

Runs the compiler without the interpreter: with ``TRITON_INTERPRET=1`` set, it re-runs itself in a child
process without it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# ints that a decode step passes as multiples of 16 (row strides, N, K, the split length, the LoRA rank)
_DIV16 = {"stride_x", "stride_o", "stride_xa", "N", "K", "KS", "R", "R_G", "R_U"}


def signature(kernel, cfg: dict, nested: bool = True, lora: bool = True, bias: bool = False,
              dtype: str = "bf16", partials: bool = False) -> tuple[dict, dict]:
    """(signature, constexprs) for compiling ``kernel`` (one of ``kernels.nf4_gemv``'s four) as ``cfg``
    (``gemv_config``'s result, or a dict with at least its keys) launches it; ``partials``: xa as
    ``kernels.lora_xa``'s fp32 partials and B as fp32 masters (a decode step's LoRA operands)."""
    unpack = cfg["UNPACK"]
    types = {"X": f"*{dtype}", "OUT": f"*{dtype}", "PART": "*fp32", "COUNT": "*i32",
             "CODE": "*i64" if unpack == 2 else "*fp32", "s": "fp32", "s_g": "fp32", "s_u": "fp32", "BIAS": f"*{dtype}"}
    for suffix, names in (("", ("PACKED", "ABSMAX", "CODE2", "ABSMAX2", "OFFSET")),
                          ("_G", ("P", "A", "C2", "A2", "O")), ("_U", ("P", "A", "C2", "A2", "O"))):
        for name, t in zip(names, ("*i32" if unpack == 3 else "*u8", "*u8" if nested else "*fp32", "*fp32", "*fp32",
                                   "*fp32")):
            types[name + suffix] = t
    lora_t = "*fp32" if partials else f"*{dtype}"
    for name in ("XA", "Bw", "XA_G", "B_G", "XA_U", "B_U"):
        types[name] = lora_t
    for i in range(3):  # the grouped kernel's projections (``kernels.nf4_group_gemv``)
        types.update({f"P{i}": types["PACKED"], f"A{i}": types["ABSMAX"], f"C2{i}": "*fp32", f"A2{i}": "*fp32",
                      f"O{i}": "*fp32", f"s{i}": "fp32"})
        types.update({f"{n}{i}": f"*{dtype}" for n in ("BIAS", "OUT")})
        types.update({f"{n}{i}": lora_t for n in ("XA", "B")})
    consts = {"BLOCKSIZE": 64, "BLOCKSIZE2": 256, "NESTED": nested, "HAS_LORA": lora, "HAS_BIAS": bias,
              "GELU": False, "FP32": dtype == "fp32", "BLOCK_R": 16, "PDL": False, "FINISH": False,
              "LUT": _lut(unpack, dtype), **cfg}
    sig = {n: types.get(n, "i32") if n not in consts else "constexpr" for n in kernel.arg_names}
    return sig, {n: v for n, v in consts.items() if n in kernel.arg_names}


def _lut(unpack: int, dtype: str) -> str:
    """The byte permutes' assembly for bitsandbytes' NF4 table in ``dtype`` (``UNPACK`` 5), else ""."""
    if unpack != 5 or dtype not in ("bf16", "fp16"):
        return ""
    import bitsandbytes as bnb

    from ..kernels.nf4_lut import code_bits, lut_asm

    code = bnb.functional.get_4bit_type("nf4", device="cpu")
    return lut_asm(code_bits(code, torch.bfloat16 if dtype == "bf16" else torch.float16))


def compile_sm90(kernel, sig: dict, consts: dict, num_warps: int = 4, num_stages: int = 1):
    """The compiled kernel for sm_90 (raises the compiler's error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n].startswith("*") or n in _DIV16}
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": False})


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run_on_cubin(tool: str, args: list, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(tool), *args, f.name], capture_output=True, text=True, check=True).stdout


def registers(cubin: bytes) -> int | None:
    found = re.search(r"REG:(\d+)", _run_on_cubin("cuobjdump", ["-res-usage"], cubin))
    return int(found.group(1)) if found else None


def opcode(instruction: str) -> str:
    """``@!P0 LDG.E.64 R2, [R4.64]`` -> ``LDG``."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction.strip()).split(" ")[0].split(".")[0]


def k_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest loop body (from a backward branch's target label to the branch)."""
    lines, labels, pending = [], {}, []
    for ln in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", ln)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?);?\s*$", ln)
        if ins:
            addr = int(ins.group(1), 16)
            labels.update({p: addr for p in pending})
            pending = []
            lines.append((addr, ins.group(2)))
    best = collections.Counter()
    for addr, ins in lines:
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", ins)
        if target and labels.get(target.group(1), addr + 1) <= addr:
            body = collections.Counter(opcode(i) for a, i in lines if labels[target.group(1)] <= a <= addr)
            if sum(body.values()) > sum(best.values()):
                best = body
    return best


def analyse(rows: int, k: int = 4096, glu: bool = False, override: dict | None = None, nested: bool = True) -> dict:
    """One configuration's row: the tile, registers and the K loop's instructions (total, per weight, per
    product, and the most frequent opcodes)."""
    from ..kernels import nf4_gemv as kernels

    cfg = kernels.gemv_config(rows, k, 64, override)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    kernel = kernels._nf4_glu_gemv_kernel if glu else kernels._nf4_gemv_kernel
    sig, consts = signature(kernel, cfg, nested)
    compiled = compile_sm90(kernel, sig, consts, warps, stages)
    cubin = compiled.asm["cubin"]
    sass = _run_on_cubin("nvdisasm", ["-c"], cubin)
    loop = k_loop(sass)
    weights = cfg["BLOCK_N"] * cfg["BLOCK_K"] / (32 * warps)  # per thread per K step (gate/up: one loop each)
    total = sum(loop.values())
    return {"rows": rows, "glu": glu, "path": "dot" if cfg["DOT"] else "cuda cores", "BLOCK_M": cfg["BLOCK_M"],
            "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"], "UNPACK": cfg["UNPACK"], "SPLIT": cfg["SPLIT"],
            "num_warps": warps, "registers": registers(cubin),
            "spills": sum(opcode(ln.split("*/", 1)[-1]) in ("LDL", "STL") for ln in sass.splitlines() if "*/" in ln),
            "loop": total,
            "per_weight": round(total / weights, 2), "per_product": round(total / weights / rows, 2),
            "layout_traffic": sum(loop[o] for o in ("STS", "LDS", "BAR", "SHFL", "STSM", "LDSM")),
            "mix": dict(loop.most_common(10))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastllm bench sass", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16", help="token rows (M), comma-separated")
    ap.add_argument("--k", type=int, default=4096, help="in_features")
    ap.add_argument("--glu", action="store_true", help="the gate/up kernel instead of the single projection")
    ap.add_argument("--override", default="{}", help="tile overrides as JSON (gemv_config's keys), e.g. "
                    "'{\"BLOCK_N\": 8, \"BLOCK_K\": 256}'")
    ap.add_argument("--out", default=None, help="append JSON lines to this file")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        return subprocess.run([sys.executable, "-m", "fastllm.bench.sass", *(argv or sys.argv[1:])], env=env).returncode
    override = json.loads(args.override)
    for rows in (int(r) for r in args.rows.split(",")):
        row = analyse(rows, args.k, args.glu, override)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
