"""Shared benchmark plumbing: timing, stamping, JSON lines, a table and a PNG bar chart."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence

import torch

from .._compat import versions


def commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def source_hash() -> str:
    """A fingerprint of the fastllm sources that ran (the device copy's git HEAD can lag the working tree)."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha1()
    for d, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(d, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:10]


def host_cpu() -> str:
    """The host CPU's model name: a host-bound step moves 10-30% between machines with the same GPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def stamp() -> dict:
    """GPU name, host CPU, versions, commit, a hash of the sources and time: put on every benchmark row."""
    return {**versions(), "cpu": host_cpu(), "commit": commit(), "source": source_hash(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def bench_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` on the GPU (``triton.testing.do_bench``, CUDA events)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_ms(fns: Sequence[Callable[[], object]], *, reps: int = 20) -> float:
    """Median milliseconds per call of ``fns``, all of them replayed as one CUDA graph: no host launch work in the
    time (decode steps run in graphs), and calls over different weights (``l2_copies``) read them from memory as
    a decode step does, where timing one call again and again would find its weight in the L2 cache."""
    for fn in fns:  # compiles and caches before the capture
        fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] / len(fns)


def l2_copies(nbytes: int) -> int:
    """How many copies of an ``nbytes`` weight together fill three times this GPU's L2 cache (at least 2)."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    return max(2, -(-3 * l2 // max(1, nbytes)))


def peak_memory(fn: Callable[[], object]) -> tuple[object, int]:
    """Run ``fn`` once and return (its result, peak allocated bytes above what was live before)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def write_jsonl(rows: Sequence[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain-text table of ``columns`` (floats to 3 significant decimals)."""
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(b) for b in body)])


def bar_chart(groups: Sequence[str], series: dict[str, Sequence[float]], *, title: str, ylabel: str,
              path: str) -> None:
    """Grouped bar chart: one group per shape/case, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * n / 2 + 3), 4.5))
    for i, (name, vals) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, vals, width=width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    finish_figure(fig, ax, title=title, ylabel=ylabel, path=path)


def finish_figure(fig, ax, *, title: str, ylabel: str, path: str) -> None:
    """Label, legend and write a benchmark figure to ``path`` (PNG), then close it."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pick(parser, text: str, allowed: Sequence[str], what: str) -> list[str]:
    """The comma-separated items of ``text``, each one of ``allowed``; else the parser's error naming the choices."""
    chosen = [x for x in text.split(",") if x]
    bad = sorted(set(chosen) - set(allowed))
    if bad:
        parser.error(f"unknown {what}(s) {bad}; choose from {', '.join(allowed)}")
    return chosen
