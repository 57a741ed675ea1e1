"""``fastllm bench memory``: peak memory and tokens/s against sequence length, and the longest sequence that fits a
memory cap, for each provider in one run (issue #21's measurements).

Each point is one ``fastllm bench train`` worker (its own process: a fresh allocator, providers that patch
process-wide kept apart) at batch ``--batch`` x length L, timed over ``--steps`` steps after ``--warmup``. A worker
that runs out of memory is a row with the error, not a crash. With ``--caps 24,80`` each provider's longest
trainable length under that cap (``torch.cuda.set_per_process_memory_fraction``, a smaller card on a large one) is
found by doubling from ``--min-seq`` then bisecting to ``--resolution`` tokens. Rows go to ``memory.jsonl`` (stamped
with GPU and versions), the plot of peak memory against length to ``memory.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

from .common import finish_figure, format_table, write_jsonl
from .train import provider_error, spawn_worker, split_providers, unavailable


def _point(provider: str, args, seq: int, cap: float | None = None) -> dict:
    """One worker at length ``seq`` (under ``cap`` GiB when given): its row, errors included."""
    worker = SimpleNamespace(steps=args.steps, warmup=args.warmup, batch=args.batch, seq=seq, device=args.device,
                             profile=None, out=args.out, timeout=args.timeout, memory_cap_gib=cap)
    row = spawn_worker(provider, args.shape, worker)
    row.update(bench="memory", seq=seq, batch=args.batch, cap_gib=cap)
    return row


def _fits(row: dict) -> bool:
    return "error" not in row


def _oom(row: dict) -> bool:
    return "out of memory" in row.get("error", "").lower()


def longest_under_cap(provider: str, args, cap: float) -> tuple[int | None, list[dict]]:
    """The longest length (a multiple of ``--resolution``) whose step fits under ``cap`` GiB, and the rows tried.
    A failure other than running out of memory ends the search with None (its row says why)."""
    tried, lo, hi = [], None, None
    seq = args.min_seq
    while seq <= args.max_seq:  # doubling until the first miss
        row = _point(provider, args, seq, cap)
        tried.append(row)
        if not _fits(row):
            if not _oom(row):
                return None, tried
            hi = seq
            break
        lo, seq = seq, seq * 2
    if lo is None or hi is None:
        return lo, tried
    while hi - lo > args.resolution:  # bisect between the last fit and the first miss
        mid = (lo + hi) // 2 // args.resolution * args.resolution
        if mid in (lo, hi):
            break
        row = _point(provider, args, mid, cap)
        tried.append(row)
        if not (_fits(row) or _oom(row)):
            return None, tried
        lo, hi = (mid, hi) if _fits(row) else (lo, mid)
    return lo, tried


def line_chart(rows: list[dict], path: str, title: str) -> None:
    """Peak GiB against sequence length, one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        pts = sorted((r["seq"], r["peak_gib"]) for r in rows if r["provider"] == provider and _fits(r))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens, batch 1)")
    finish_figure(fig, ax, title=title, ylabel="peak GiB", path=path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastllm bench memory", description=__doc__.split("\n")[0])
    p.add_argument("--providers", default="hf,unsloth,fastllm")
    p.add_argument("--shape", default="8b")
    p.add_argument("--seqs", default="8192,16384,32768,65536,131072", help="lengths of the curve")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3,
                   help='untimed steps: "auto" calibrates on two and checks the third')
    p.add_argument("--caps", default="", help="GiB caps for the longest-length search, e.g. 24,80")
    p.add_argument("--min-seq", type=int, default=4096)
    p.add_argument("--max-seq", type=int, default=262144)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    seqs = [int(s) for s in args.seqs.split(",") if s]
    caps = [float(c) for c in args.caps.split(",") if c]
    if caps and args.device != "cuda":
        p.error("--caps needs --device cuda (the cap is a CUDA allocator fraction)")
    why = provider_error(args.providers)
    if why:
        p.error(why)
    rows, longest = [], []
    for provider in split_providers(args.providers):
        why = unavailable(provider)
        if why is not None:
            rows.append({"bench": "memory", "provider": provider, "shape": args.shape, "error": why})
            continue
        for seq in seqs:
            rows.append(_point(provider, args, seq))
            print(json.dumps({k: rows[-1].get(k) for k in ("provider", "seq", "peak_gib", "tokens_per_s", "error")}),
                  flush=True)
        for cap in caps:
            best, tried = longest_under_cap(provider, args, cap)
            rows += tried
            longest.append({"bench": "memory-longest", "provider": provider, "shape": args.shape, "cap_gib": cap,
                            "longest_seq": best, "tried": [r["seq"] for r in tried]})
            print(json.dumps(longest[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(rows + longest, os.path.join(args.out, "memory.jsonl"))
    curve = [r for r in rows if r.get("cap_gib") is None and "seq" in r]
    print(format_table([r for r in curve if _fits(r)], ["provider", "seq", "tokens_per_s", "peak_gib", "step_ms"]))
    for r in curve:
        if not _fits(r):
            print(f"{r['provider']} at {r['seq']}: FAILED {r['error'][-200:]}")
    if longest:
        print(format_table(longest, ["provider", "cap_gib", "longest_seq"]))
    ok = [r for r in curve if _fits(r)]
    if ok:
        line_chart(ok, os.path.join(args.out, "memory.png"),
                   f"{args.shape} QLoRA step, batch {args.batch}, {ok[0].get('gpu', args.device)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
