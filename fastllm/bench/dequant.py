"""``fastllm bench dequant``: NF4 dequant GB/s and one QLoRA linear's fwd+bwd, fastllm vs bitsandbytes.

Providers for the dequant (double-quant NF4, blocksize 64, output bf16/fp16, Llama-3-8B shapes):
  fastllm     ``fastllm.ops.dequantize_nf4`` into a preallocated output (one Triton launch)
  bnb         ``bitsandbytes.functional.dequantize_4bit`` (allocates; absmax pass + 4-bit pass)
  bnb-direct  Unsloth's ``fast_dequantize``: bitsandbytes' C entry points called through ctypes into
              preallocated buffers (``cdequantize_blockwise_fp32`` for the absmax, ``+= offset``,
              ``cdequantize_blockwise_{bf16,fp16}_nf4`` for the weight): no Python dispatch
``ms`` is ``triton.testing.do_bench`` (L2 flushed between calls, which also hides host work);
``loop_ms`` times calls issued back to back, so host overhead shows where a call is host-bound.
GB/s counts bytes read (packed nibbles, 8-bit absmax, second-level state) plus bytes written. The
device's copy bandwidth (read + write) is measured in the same run for scale. The QLoRA linear is a
bnb ``Linear4bit`` (compute dtype bf16) at 8192 tokens, forward + input-gradient backward, with and
without ``nf4_linear4bit_forward`` bound. Results: ``<out>/dequant.jsonl``, ``dequant.png``,
``linear.png`` and a printed table. ``--sweep`` also times kernel tile sizes (for tuning).

The measured rows and their history are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import statistics
import types

import torch

from .common import bar_chart, bench_ms, copy_bandwidth_gbs, format_table, stamp, write_jsonl

log = logging.getLogger(__name__)

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
QUICK = ("q/o", "gate/up")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _quantize(shape, dtype):
    import bitsandbytes.functional as F

    w = torch.randn(shape, dtype=dtype, device="cuda")
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed, qs


def _bytes_moved(qs, out_dtype) -> int:
    n = qs.shape.numel()
    state = qs.absmax.numel() * qs.absmax.element_size() + qs.state2.absmax.numel() * 4 + 256 * 4 + 64
    return (n + 1) // 2 + state + n * torch.empty((), dtype=out_dtype).element_size()


def bnb_direct(packed, qs, dtype):
    """Unsloth's way: bnb's C functions through ctypes into preallocated buffers. Returns a closure."""
    from bitsandbytes.cextension import lib

    out = torch.empty(tuple(qs.shape), dtype=dtype, device="cuda")
    out_absmax = torch.empty(qs.absmax.numel(), dtype=torch.float32, device="cuda")
    fx = lib.cdequantize_blockwise_bf16_nf4 if dtype == torch.bfloat16 else lib.cdequantize_blockwise_fp16_nf4
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    code2, absmax2, absmax, offset = qs.state2.code, qs.state2.absmax, qs.absmax, qs.offset
    n_absmax, bs2, bs, n = absmax.numel(), qs.state2.blocksize, qs.blocksize, out.numel()
    ptr = ctypes.c_void_p

    def run():
        lib.cdequantize_blockwise_fp32(ptr(code2.data_ptr()), ptr(absmax.data_ptr()), ptr(absmax2.data_ptr()),
                                       ptr(out_absmax.data_ptr()), ctypes.c_int(bs2), ctypes.c_int(n_absmax),
                                       stream)
        out_absmax.add_(offset)
        fx(None, ptr(packed.data_ptr()), ptr(out_absmax.data_ptr()), ptr(out.data_ptr()), ctypes.c_int(bs),
           ctypes.c_int(n), stream)
        return out

    return run


def loop_ms(fn, n: int = 200) -> float:
    """Milliseconds per call of ``fn`` issued back to back: includes host overhead when host-bound.

    ``bench_ms`` (do_bench) flushes L2 with a large memset before each call, which also hides up to
    ~0.1 ms of host work per call; training loops see the host cost when the GPU is not ahead.
    """
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def _dequant_case(name: str, dname: str, copy_gbs: float, sweep: bool) -> list[dict]:
    import bitsandbytes.functional as F

    from ..kernels.nf4 import nf4_dequant_fwd
    from ..ops.nf4 import dequantize_nf4

    shape, dtype = SHAPES[name], DTYPES[dname]
    label = f"{name} {shape[0]}x{shape[1]}"
    packed, qs = _quantize(shape, dtype)
    out = torch.empty(shape, dtype=dtype, device="cuda")
    direct = bnb_direct(packed, qs, dtype)
    ref = F.dequantize_4bit(packed, qs)
    # Bit-exactness is part of the benchmark: a fast wrong kernel must not be reported.
    assert torch.equal(dequantize_nf4(packed, qs, out=out), ref), (name, dname)
    assert torch.equal(direct(), ref), (name, dname, "bnb-direct")
    providers = {"fastllm": lambda: dequantize_nf4(packed, qs, out=out),
                 "bnb": lambda: F.dequantize_4bit(packed, qs),
                 "bnb-direct": direct}
    nbytes = _bytes_moved(qs, dtype)
    ms = {p: bench_ms(fn) for p, fn in providers.items()}
    loop = {p: loop_ms(fn) for p, fn in providers.items()}
    rows = [{"bench": "dequant", "shape": label, "dtype": dname, "provider": p, "ms": t,
             "gbs": nbytes / t / 1e6, "copy_gbs": copy_gbs, "pct_copy": 100 * nbytes / t / 1e6 / copy_gbs,
             "x_vs_bnb": ms["bnb"] / t, "x_vs_bnb_direct": ms["bnb-direct"] / t,
             "loop_ms": loop[p], "loop_x_vs_bnb": loop["bnb"] / loop[p],
             "loop_x_vs_bnb_direct": loop["bnb-direct"] / loop[p]} for p, t in ms.items()]
    if sweep:
        s2 = qs.state2
        for tile in (1024, 2048, 4096, 8192, 16384):
            for warps in (2, 4, 8, 16):
                t = bench_ms(lambda tile=tile, warps=warps: nf4_dequant_fwd(
                    packed, qs.absmax, qs.code, 64, out, s2.code, s2.absmax, qs.offset.reshape(1),
                    s2.blocksize, tile_bytes=tile, num_warps=warps))
                rows.append({"bench": "sweep", "shape": label, "dtype": dname,
                             "provider": f"tile{tile}_w{warps}", "ms": t, "gbs": nbytes / t / 1e6})
    return rows


def bench_dequant(names, dtypes, copy_gbs, sweep=False) -> list[dict]:
    return [r for name in names for d in dtypes for r in _dequant_case(name, d, copy_gbs, sweep and d == "bf16")]


def _linear_case(name: str, tokens: int, rounds: int = 5) -> list[dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from ..modules.nf4_linear import nf4_linear4bit_forward

    n, k = SHAPES[name]
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(n, k, dtype=torch.bfloat16), requires_grad=False,
                                    quant_type="nf4", compress_statistics=True)
    base = base.cuda()
    x = torch.randn(tokens, k, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dy = torch.randn(tokens, n, dtype=torch.bfloat16, device="cuda")
    dense = F.dequantize_4bit(base.weight.data, base.weight.quant_state)  # the GEMM floor: no dequant at all
    providers = {"bnb": base.forward, "fastllm": types.MethodType(nf4_linear4bit_forward, base),
                 "dense": lambda x: torch.nn.functional.linear(x, dense)}
    samples, res = {p: [] for p in providers}, {}
    for p, fwd in providers.items():
        res[p] = torch.autograd.grad(fwd(x), x, dy)[0]
    # GEMM-bound and within a few % of each other: rounds interleave the providers so clock and thermal drift
    # hit all alike, and the median of the rounds is reported
    for _ in range(rounds):
        for p, fwd in providers.items():
            samples[p].append(bench_ms(lambda fwd=fwd: torch.autograd.grad(fwd(x), x, dy)))
    ms = {p: statistics.median(v) for p, v in samples.items()}
    torch.testing.assert_close(res["fastllm"], res["bnb"], rtol=2e-2, atol=2e-2)
    flops = 2 * 2 * tokens * n * k  # forward GEMM + input-gradient GEMM
    return [{"bench": "linear_fwd_bwd", "shape": f"{name} {n}x{k}", "dtype": "bf16", "tokens": tokens,
             "provider": p, "ms": t, "ms_min": min(samples[p]), "ms_max": max(samples[p]), "rounds": rounds,
             "tflops": flops / t / 1e9, "x_vs_bnb": ms["bnb"] / t} for p, t in ms.items()]


def bench_linear(names, tokens=8192) -> list[dict]:
    return [r for name in names for r in _linear_case(name, tokens)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastllm bench dequant", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out", help="folder for dequant.jsonl and the PNGs")
    ap.add_argument("--quick", action="store_true", help="two shapes, bf16 only")
    ap.add_argument("--sweep", action="store_true", help="also time kernel tile sizes / warps")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        log.error("fastllm bench dequant needs a CUDA GPU")
        return 2
    names = QUICK if args.quick else tuple(SHAPES)
    dtypes = ("bf16",) if args.quick else tuple(DTYPES)
    copy_gbs = copy_bandwidth_gbs()
    rows = bench_dequant(names, dtypes, copy_gbs, sweep=args.sweep)
    rows += bench_linear(("q/o",) if args.quick else ("q/o", "k/v", "gate/up", "down"))
    meta = stamp()
    write_jsonl([{**meta, **r} for r in rows], os.path.join(args.out, "dequant.jsonl"))

    main_rows = [r for r in rows if r["bench"] == "dequant"]
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s ({meta.get('gpu', '?')})")
    print(format_table(main_rows, ["shape", "dtype", "provider", "ms", "gbs", "pct_copy", "x_vs_bnb",
                                   "x_vs_bnb_direct", "loop_ms", "loop_x_vs_bnb", "loop_x_vs_bnb_direct"]))
    lin = [r for r in rows if r["bench"] == "linear_fwd_bwd"]
    print(format_table(lin, ["shape", "tokens", "provider", "ms", "ms_min", "ms_max", "tflops", "x_vs_bnb"]))
    sweep = [r for r in rows if r["bench"] == "sweep"]
    if sweep:
        print(format_table(sweep, ["shape", "dtype", "provider", "ms", "gbs"]))

    groups = list(dict.fromkeys((r["shape"], r["dtype"]) for r in main_rows))
    series = {p: [next(r["gbs"] for r in main_rows if (r["shape"], r["dtype"]) == g and r["provider"] == p)
                  for g in groups] for p in ("fastllm", "bnb-direct", "bnb")}
    series["copy (read+write)"] = [copy_gbs] * len(groups)
    bar_chart([f"{s} {d}" for s, d in groups], series, title=f"NF4 dequant GB/s, {meta.get('gpu', '')}",
              ylabel="GB/s", path=os.path.join(args.out, "dequant.png"))
    lgroups = [r["shape"] for r in lin if r["provider"] == "bnb"]
    bar_chart(lgroups, {p: [r["ms"] for r in lin if r["provider"] == p] for p in ("fastllm", "bnb", "dense")},
              title="QLoRA linear fwd+bwd (8192 tokens, bf16), ms", ylabel="ms",
              path=os.path.join(args.out, "linear.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
