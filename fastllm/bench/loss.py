"""``fastllm bench loss``: lm_head + cross-entropy, peak extra memory and fwd+bwd time (GPU).

Shape of the issue's goals: 4 x 4096 tokens, hidden 4096, vocab 128256, bf16, once with only the
hidden states requiring grad ("x") and once with the weight too ("x+W"). Providers:

- ``materialised``: ``F.cross_entropy((h @ W.T).float(), y)``, transformers' way;
- ``fastllm``: ``fastllm.ops.linear_cross_entropy`` (auto chunk), plus ``fastllm-cN`` at fixed
  chunk sizes so the chunk trade-off is measured in the same run;
- ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` when importable;
- ``cce``: Apple's ``cut_cross_entropy.linear_cross_entropy`` when importable, with its default gradient
  filtering (``filter_eps="high"``: backward skips every tile whose softmax gradients are all below bf16
  eps / 32, i.e. it drops those gradient entries), and ``cce-exact`` (``filter_eps=None``) computing all of
  them like fastllm, Liger and the materialised reference do.

"Peak extra" is ``max_memory_allocated`` during one fwd+bwd minus what was allocated before (the
inputs); it includes the gradients themselves (``h.grad`` 0.125 GiB, ``W.grad`` 0.98 GiB here).

The measured rows and their history are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .common import bar_chart, bench_ms, format_table, peak_memory, stamp, write_jsonl

logger = logging.getLogger(__name__)
GiB = 1 << 30


def providers(chunks: tuple[int, ...]) -> dict[str, Callable]:
    """name -> fn(h [N, H], W [V, H], y [N]) -> scalar loss, for those that import here."""
    from ..ops.linear_cross_entropy import linear_cross_entropy

    out: dict[str, Callable] = {
        "materialised": lambda h, W, y: F.cross_entropy((h @ W.t()).float(), y),
        "fastllm": lambda h, W, y: linear_cross_entropy(h, W, y),
    }
    for c in chunks:
        out[f"fastllm-c{c}"] = lambda h, W, y, c=c: linear_cross_entropy(h, W, y, chunk_size=c)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda h, W, y: liger(W, h, y)
    except ImportError as e:
        logger.info("liger not importable (%s): skipped", e)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cce"] = lambda h, W, y: cce(h, W, y)
        out["cce-exact"] = lambda h, W, y: cce(h, W, y, filter_eps=None)
    except ImportError as e:
        logger.info("cut_cross_entropy not importable (%s): skipped", e)
    return out


def _measure(fn: Callable, h, W, y, *, rep: int) -> dict:
    def step():
        h.grad = None
        W.grad = None
        fn(h, W, y).backward()

    step()  # compile / autotune outside the measurements
    h.grad = W.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    _, peak = peak_memory(step)
    ms = bench_ms(step, warmup=5, rep=rep)
    loss = float(fn(h, W, y).detach())
    h.grad = W.grad = None
    return {"peak_extra_gib": peak / GiB, "ms": ms, "loss": loss}


def run(*, tokens: int, hidden: int, vocab: int, dtype=torch.bfloat16, chunks=(128, 256, 1024), rep=50,
        only: tuple[str, ...] | None = None) -> list[dict]:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    h = (torch.randn(tokens, hidden, device=dev) * 0.5).to(dtype)
    W = (torch.randn(vocab, hidden, device=dev) * hidden**-0.5).to(dtype)
    y = torch.randint(0, vocab, (tokens,), device=dev)
    y[::7] = -100
    rows, base = [], stamp()
    for mode, w_grad in (("x", False), ("x+W", True)):
        h.requires_grad_(True)
        W.requires_grad_(w_grad)
        for name, fn in providers(chunks).items():
            if only and name not in only:
                continue
            try:
                res = _measure(fn, h, W, y, rep=rep)
            except torch.OutOfMemoryError as e:  # the materialised baseline may not fit on small cards
                logger.warning("%s %s: out of memory (%s)", name, mode, e)
                h.grad = W.grad = None
                gc.collect()
                torch.cuda.empty_cache()
                continue
            rows.append({**base, "bench": "loss", "provider": name, "grad": mode, "tokens": tokens,
                         "hidden": hidden, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""), **res})
    ref = {r["grad"]: r for r in rows if r["provider"] == "materialised"}
    for r in rows:
        if r["grad"] in ref:
            r["ms_vs_materialised"] = r["ms"] / ref[r["grad"]]["ms"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastllm bench loss", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-out", help="directory for loss.jsonl and loss.png")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (a smoke run)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if args.quick:
        rows = run(tokens=2048, hidden=1024, vocab=32000, rep=10, chunks=())
    else:
        rows = run(tokens=4 * 4096, hidden=4096, vocab=128256)
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(rows, os.path.join(args.out, "loss.jsonl"))
    print(format_table(rows, ["provider", "grad", "peak_extra_gib", "ms", "ms_vs_materialised", "loss"]))
    groups = sorted({r["provider"] for r in rows}, key=[r["provider"] for r in rows].index)
    for key, label in (("ms", "fwd+bwd ms"), ("peak_extra_gib", "peak extra GiB")):
        series = {mode: [next((r[key] for r in rows if r["provider"] == g and r["grad"] == mode), 0.0)
                         for g in groups] for mode in ("x", "x+W")}
        bar_chart(groups, series, title=f"lm_head+CE {rows[0]['tokens']}x{rows[0]['hidden']}x{rows[0]['vocab']} "
                  f"bf16 ({rows[0].get('gpu', '?')})", ylabel=label, path=os.path.join(args.out, f"loss_{key}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
