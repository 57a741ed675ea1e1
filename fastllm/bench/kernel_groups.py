"""Where a decode step's device time goes: a profiled run's kernels grouped by what they do.

``group_times(kernels)`` sums device time and calls per group over ``(name, device_us, calls)`` triples; a kernel
falls in the first group one of whose patterns its lower-cased name contains, else in "other". ``step_groups``
takes two such sums, of a generate of ``n`` new tokens and of one new token (prefill and the first step), and
divides their difference by ``n - 1``: the groups of one decode step, the prompt's prefill taken out.
"""

from __future__ import annotations

__all__ = ["GROUPS", "group_of", "group_times", "profiled_kernels", "step_groups", "step_kernels"]

# first match wins: attention before GEMM (its kernels are CUTLASS ones), copies before the generic elementwise
# kernels that run them, attention before "max"
GROUPS = (
    ("NF4 GEMV (fastllm)", ("nf4_gemv", "nf4_glu_gemv", "nf4_group_gemv", "_epilogue_kernel")),
    ("NF4 GEMV (bitsandbytes)", ("gemm_4bit", "gemv_4bit")),
    ("NF4 dequant", ("dequant",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("GEMM (cuBLAS, CUTLASS)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "splitk")),
    ("RMSNorm", ("rms",)),
    ("RoPE", ("rope",)),
    ("LoRA casts and adds", ("cast_cat", "lora_add")),
    ("copies, cache updates", ("copy", "index", "catarray", "scatter", "fill", "memcpy", "memset")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
    ("reductions, sampling", ("reduce", "argmax", "max", "topk", "sort")),
)


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pats in GROUPS if any(p in low for p in pats)), "other")


def group_times(kernels) -> dict:
    """``{group: {"us": device microseconds, "calls": launches, "kernels": distinct names}}`` over
    ``(name, device_us, calls)`` triples."""
    out: dict = {}
    for name, us, calls in kernels:
        g = out.setdefault(group_of(name), {"us": 0.0, "calls": 0, "kernels": 0})
        g["us"] += us
        g["calls"] += calls
        g["kernels"] += 1
    return out


def step_groups(long: dict, short: dict, n: int) -> list[dict]:
    """Rows ``{group, us_per_step, calls_per_step, share}`` of one decode step, largest first: ``long`` (a generate
    of ``n`` new tokens) less ``short`` (one new token), over ``n - 1`` steps; ``share`` of the step's kernel time."""
    if n < 2:
        raise ValueError(f"step_groups needs n >= 2 new tokens, got {n}")
    rows = []
    for g in long:
        base = short.get(g, {"us": 0.0, "calls": 0})
        rows.append({"group": g, "us_per_step": (long[g]["us"] - base["us"]) / (n - 1),
                     "calls_per_step": (long[g]["calls"] - base["calls"]) / (n - 1)})
    total = sum(r["us_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["us_per_step"] / total if total > 0 else float("nan")
    rows.append({"group": "all kernels", "us_per_step": total, "calls_per_step": sum(r["calls_per_step"] for r in rows),
                 "share": 1.0})
    return sorted(rows, key=lambda r: -r["us_per_step"])


def step_kernels(long, short, n: int, top: int = 40) -> list[dict]:
    """Rows ``{kernel, group, us_per_step, calls_per_step}`` of one decode step per kernel name, the ``top`` largest:
    ``long`` less ``short`` ``(name, device_us, calls)`` triples (as ``step_groups``), over ``n - 1`` steps."""
    if n < 2:
        raise ValueError(f"step_kernels needs n >= 2 new tokens, got {n}")
    base = {}
    for name, us, calls in short:
        b = base.setdefault(name, [0.0, 0])
        b[0], b[1] = b[0] + us, b[1] + calls
    per: dict = {}
    for name, us, calls in long:
        p = per.setdefault(name, [0.0, 0])
        p[0], p[1] = p[0] + us, p[1] + calls
    rows = [{"kernel": name, "group": group_of(name), "us_per_step": (us - base.get(name, [0.0, 0])[0]) / (n - 1),
             "calls_per_step": (calls - base.get(name, [0.0, 0])[1]) / (n - 1)} for name, (us, calls) in per.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])[:top]


def profiled_kernels(prof) -> list[tuple]:
    """``(name, device_us, calls)`` of each device kernel in a finished ``torch.profiler.profile`` (graph replays'
    kernels included: CUPTI reports them one by one)."""
    from torch.autograd import DeviceType

    rows = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        rows.append((e.key, us if us is not None else e.self_cuda_time_total, e.count))
    return rows
