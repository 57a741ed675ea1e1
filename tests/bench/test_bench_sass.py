"""``fastllm bench sass``: the decode GEMV compiled for sm_90 on the CPU and its K loop counted from the real
disassembly. Checks what the word-mode kernel is built to guarantee, whatever the compiler's exact schedule: the K
loop is found, nothing spills, no cross-thread reduction (``SHFL``) runs inside it (every product has its own
accumulator, summed once after the loop), and each decoded weight serves every row (more rows, fewer instructions
a product)."""

import json
import os
import subprocess
import sys

import pytest

from fastllm.bench.sass import k_loop, opcode


def test_opcode_and_k_loop_read_nvdisasm_text():
    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        .L_x_0:
        /*0010*/                   LDG.E.64 R2, desc[UR4][R4.64] ;
        /*0020*/              @!P0 FFMA R6, R2, R3, R6 ;
        /*0030*/               @P1 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
"""
    assert opcode("@!P0 LDG.E.64 R2, [R4.64]") == "LDG"
    assert k_loop(text) == {"LDG": 1, "FFMA": 1, "BRA": 1}


def test_sass_rows_of_the_word_mode(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "sass.jsonl"
    # run with the interpreter on, as the test session has it: the tool re-runs itself without it
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # the word mode on the CUDA cores at both row counts (the defaults may pick bytes or the tensor cores)
    words = json.dumps({"UNPACK": 3, "DOT": False})
    run = subprocess.run([sys.executable, "-m", "fastllm.bench.sass", "--rows", "1,8", "--override", words,
                          "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rows"] for r in rows] == [1, 8]
    for r in rows:
        assert r["path"] == "cuda cores" and r["UNPACK"] == 3
        assert r["loop"] > 0 and r["mix"].get("SHFL", 0) == 0 and r["spills"] == 0, r
        assert r["mix"]["FFMA"] > 0
    one, eight = rows
    assert eight["per_product"] < one["per_product"]
