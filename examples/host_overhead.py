"""Host (CPU) cost per call of the pieces of one 4-bit linear, on a GPU machine.

Decode steps and small training steps are host-bound: the GPU waits while Python and the dispatcher
issue work. Each row times ``n`` back-to-back calls on one-token inputs (the GPU part is a few
microseconds) and reports microseconds per call, so the numbers are host time. Usage::

    python examples/host_overhead.py [--n 500] [--out host.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
import types

import torch


def per_call_us(fn, n: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    import bitsandbytes as bnb

    from fastllm.kernels.nf4 import launch_config, nf4_dequant_fwd
    from fastllm.modules.nf4_linear import nf4_linear4bit_forward
    from fastllm.ops import dequantize_nf4
    from fastllm.ops.nf4 import NF4LinearFunction, _absmax_torch, nf4_args, nf4_linear_args, state_args

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lin = bnb.nn.Linear4bit(4096, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
    fast = bnb.nn.Linear4bit(4096, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
    fast.forward = types.MethodType(nf4_linear4bit_forward, fast)
    w, qs = lin.weight, lin.weight.quant_state
    x1 = torch.randn(1, 1, 4096, dtype=torch.bfloat16, device="cuda")
    small = torch.randn(16, device="cuda")
    dense = torch.empty(4096, 4096, dtype=torch.bfloat16, device="cuda")
    absmax, code, code2, absmax2, offset, bs, bs2, shape = state_args(qs)
    plain = w.data
    rows, cols, warps, grid = launch_config(plain.numel(), bs)
    cases = {
        "aten add (16 floats)": lambda: small.add(1.0),
        "F.linear bf16 1x4096x4096": lambda: torch.nn.functional.linear(x1, dense),
        "bnb dequantize_4bit": lambda: bnb.functional.dequantize_4bit(w, qs),
        "fastllm dequantize_nf4 (Triton)": lambda: dequantize_nf4(w, qs, out=dense),
        "fastllm nf4_dequant_fwd, plain tensors": lambda: nf4_dequant_fwd(plain, absmax, code, bs, dense, code2,
                                                                          absmax2, offset, bs2),
        "absmax dequant (torch ops)": lambda: _absmax_torch(absmax, code2, absmax2, offset, bs2),
        "bnb Linear4bit fwd, 1 token (gemv)": lambda: lin(x1),
        "fastllm patched fwd, 1 token": lambda: fast(x1),
    }
    xg = torch.randn(16, 4096, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    args4 = nf4_args(plain, qs)
    grad_cases = {  # what autograd adds per call: the custom op (compiled regions) vs an autograd.Function
        "fastllm::nf4_linear custom op, grad": lambda: nf4_linear_args(xg, args4),
        "NF4LinearFunction.apply, grad": lambda: NF4LinearFunction.apply(xg, w, None, "auto"),
    }
    print(f"launch config {rows}x{cols}, {warps} warps, grid {grid}")
    results = []
    with torch.no_grad():
        for name, fn in cases.items():
            us = per_call_us(fn, args.n)
            results.append({"case": name, "us_per_call": us})
            print(f"{name:42s} {us:8.1f} us")
    for name, fn in grad_cases.items():
        us = per_call_us(fn, args.n)
        results.append({"case": name, "us_per_call": us})
        print(f"{name:42s} {us:8.1f} us")
    with torch.no_grad():
        for name, fn in _launch_cases().items():
            us = per_call_us(fn, args.n)
            results.append({"case": name, "us_per_call": us})
            print(f"{name:42s} {us:8.1f} us")
    if args.out:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


def _launch_cases() -> dict:
    """A 256x256 weight (the GPU part is ~2 us): where the host time of one dequant goes."""
    import bitsandbytes.functional as F

    from fastllm.bench.dequant import bnb_direct
    from fastllm.kernels import launch as L
    from fastllm.kernels.nf4 import _nf4_dequant_fwd_kernel, launch_config
    from fastllm.ops import dequantize_nf4
    from fastllm.ops.nf4 import state_args

    w = torch.randn(256, 256, dtype=torch.bfloat16, device="cuda")
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    out = torch.empty(256, 256, dtype=torch.bfloat16, device="cuda")
    absmax, code, code2, absmax2, offset, bs, bs2, shape = state_args(qs)
    n = out.numel()
    rows, cols, warps, grid = launch_config((n + 1) // 2, bs)
    kargs = (packed, absmax, code, code2, absmax2, offset, out, n, (n + 1) // 2)
    kw = dict(BLOCKSIZE=bs, BLOCKSIZE2=bs2, NESTED=True, ROWS=rows, COLS=cols, num_warps=warps,
              enable_fp_fusion=False)
    L.launch(_nf4_dequant_fwd_kernel, (grid,), *kargs, **kw)
    hit = next((v for k, v in L._CACHE.items() if k[0] == id(_nf4_dequant_fwd_kernel)), None)
    cases = {"256x256: fastllm dequantize_nf4": lambda: dequantize_nf4(packed, qs, out=out),
             "256x256: bnb-direct (ctypes)": bnb_direct(packed, qs, torch.bfloat16),
             "256x256: launch() only": lambda: L.launch(_nf4_dequant_fwd_kernel, (grid,), *kargs, **kw),
             "256x256: kernel[grid]": lambda: _nf4_dequant_fwd_kernel[(grid,)](*kargs, **kw),
             "current_device + raw stream": lambda: torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())}
    if hit is not None:
        run, c_launch, function, metadata, tail = hit
        stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
        cases["256x256: compiled launcher call"] = lambda: run(grid, 1, 1, stream, function, metadata, None, None,
                                                                None, *kargs, *tail)
        if c_launch is not None:
            fn, coop, pdl = c_launch
            cases["256x256: C launch function"] = lambda: fn(grid, 1, 1, stream, function, coop, pdl, None, None,
                                                             metadata, None, None, None, *kargs, *tail)
    return cases


if __name__ == "__main__":
    main()
