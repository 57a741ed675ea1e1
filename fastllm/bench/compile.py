"""``fastllm bench compile``: eager vs torch.compile'd QLoRA Llama, training step and inference (GPU).

Models are Llama-3-shaped with random weights built here (no download): the decoder's seven linears per
layer become bitsandbytes NF4 ``Linear4bit`` (double quant, bf16 compute), LoRA r16 on all of them through
``FastLlama.get_peft_model``. Providers, all on the same model object in the same run:

- ``eager``: transformers + PEFT + bitsandbytes as they come (unpatched);
- ``fastllm``: fastllm's patches without compile (fused norms/SwiGLU, NF4 linear, chunked loss);
- ``fastllm+compile``: ``PatchConfig(compile=True)`` (its regions include the NF4 linear; the loss patch stays on).

Training: bs x seq tokens per step, non-reentrant gradient checkpointing, bf16 autocast (how HF Trainer runs
QLoRA), AdamW on the LoRA weights; tokens/s from the median step, peak memory of a step, compile time = first
step minus a median step. Inference: prefill of a ``prompt``-token prompt, then greedy decode of 128 tokens
(``generate``; fastllm's providers over a static cache with ``decode_graphs``, transformers' eager over its dynamic
cache): latency (median of runs, the providers' runs interleaved) and peak memory. ``eager+static``: transformers'
own static-cache generate; ``-nographs``: a fastllm provider with ``decode_graphs=False``; ``unsloth``
(inference only): Unsloth's ``FastLanguageModel.for_inference`` on the same weights (``unsloth_provider``), in a
child process (Unsloth patches transformers at import), timed the same way over the same prompt.

Measurements and their history: docs/benchmarks.md, "compile and generation".

One shape and mode per call keeps each under the device tool's 10-minute limit::

    fastllm bench compile --shapes 1b --modes infer --quick --out $OUT/b1   # then --shapes 8b, then --modes train
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import time

import torch

from ..patching.api import patch_report
from .common import bar_chart, format_table, pick, stamp, write_jsonl
from .models import SHAPES, build_qlora_base

logger = logging.getLogger(__name__)
GiB = 1 << 30

def build_qlora(shape: str, device: torch.device, dtype=torch.bfloat16):
    """A random Llama-3-shaped NF4 model (``bench.models``) with LoRA r16 on all 7 linears (a PeftModel)."""
    from .. import FastLlama

    model = build_qlora_base(shape, device, dtype=dtype)
    gc.collect()
    return FastLlama.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=True)


PROVIDERS = ("eager", "eager+static", "fastllm", "fastllm+compile", "fastllm-nographs", "fastllm+compile-nographs",
             "unsloth")
CHILD = ("unsloth",)  # providers measured in a child process


def set_provider(model, provider: str) -> None:
    from .. import PatchConfig, patch, unpatch

    unpatch(model)
    name, _, suffix = provider.partition("-")  # "...-nographs": decode steps without CUDA graphs
    if name in ("fastllm", "fastllm+compile"):
        patch(model, PatchConfig(compile=name == "fastllm+compile", gradient_checkpointing=True,
                                 decode_graphs=False if suffix == "nographs" else None))


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_train(model, *, batch: int, seq: int, steps: int) -> dict:
    vocab = model.config.get_text_config().vocab_size
    x = torch.randint(0, vocab, (batch, seq), device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    first = sync_time(step)
    torch.cuda.reset_peak_memory_stats()
    times = [sync_time(step) for _ in range(steps)]
    med = statistics.median(times)
    return {"tokens_per_s": batch * seq / med, "step_ms": med * 1e3, "first_step_s": first,
            "compile_s": max(first - med, 0.0), "peak_gib": torch.cuda.max_memory_allocated() / GiB}


def infer_inputs(model, prompt: int, new_tokens: int, batch: int = 1):
    # seeded on the host: the unsloth child process feeds the same prompts
    vocab = model.config.get_text_config().vocab_size
    x = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(2)).cuda()
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    return x, gen


def _gen_of(provider: str, gen: dict) -> dict:
    """``eager+static``: transformers' own fast generate, a static cache (which makes ``generate`` torch.compile the
    forward with CUDA graphs, ``reduce-overhead``, where transformers finds it compileable)."""
    return {**gen, "cache_implementation": "static"} if provider == "eager+static" else gen


def infer_once(model, x, gen) -> tuple[float, float]:
    """(prefill seconds, generate seconds) of one measurement: eval, no grad, bf16 autocast."""
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        prefill = sync_time(lambda: model(input_ids=x, use_cache=True))
        total = sync_time(lambda: model.generate(input_ids=x, **gen))
    return prefill, total


def infer_row(first: float, prefills: list, totals: list, new_tokens: int) -> dict:
    prefill, total = statistics.median(prefills), statistics.median(totals)
    return {"prefill_ms": prefill * 1e3, "generate_ms": total * 1e3, "generate_ms_min": min(totals) * 1e3,
            "generate_ms_max": max(totals) * 1e3, "decode_ms_per_token": (total - prefill) * 1e3 / new_tokens,
            "first_generate_s": first, "peak_gib": torch.cuda.max_memory_allocated() / GiB}


def measure_infer_interleaved(model, providers, *, prompt: int, new_tokens: int, runs: int) -> dict:
    """``measure_infer`` for every provider, the runs interleaved (provider 1, 2, 3, 1, 2, 3...): decode is
    host-bound, and a host's speed drifts by 10-40% within minutes, which one provider's block of runs would
    take for a difference between providers. Compiled regions keep their graphs between rounds."""
    x, gen = infer_inputs(model, prompt, new_tokens)
    first, samples, peaks, notes = {}, {p: [] for p in providers}, {}, {}
    for p in providers:  # warm-up (compiles) once per provider
        set_provider(model, p)
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            kw = _gen_of(p, gen)
            first[p] = sync_time(lambda: model.generate(input_ids=x, **kw))  # noqa: B023 - called right here
    for _ in range(runs):
        for p in providers:
            set_provider(model, p)
            torch.cuda.reset_peak_memory_stats()
            samples[p].append(infer_once(model, x, _gen_of(p, gen)))
            peaks[p] = max(peaks.get(p, 0.0), torch.cuda.max_memory_allocated() / GiB)
            report = patch_report(model)
            graphs = report.live.get("decode_graphs") if report is not None else None
            if graphs is not None:  # this round's decode steps: captured, replayed, eager and why
                notes[p] = graphs.summary()
    rows = {}
    for p in providers:
        rows[p] = infer_row(first[p], [a for a, _ in samples[p]], [b for _, b in samples[p]], new_tokens)
        rows[p]["peak_gib"] = peaks[p]
        if p in notes:
            rows[p]["decode_graphs"] = notes[p]
    return rows


def _emit(row: dict, path: str | None) -> None:
    """Print a finished row and append it to ``path`` at once, so a run cut short keeps what it measured."""
    keys = ("shape", "provider", "mode", "tokens_per_s", "generate_ms", "peak_gib", "graphs", "graph_breaks",
            "rel_err", "argmax_agree", "vs_floor")
    print(json.dumps({k: row[k] for k in keys if k in row}), flush=True)
    if path:
        write_jsonl([row], path)


def run(shape: str, *, batch: int, seq: int, steps: int, prompt: int, new_tokens: int, runs: int,
        providers=("eager", "fastllm", "fastllm+compile"), modes=("train", "infer"),
        jsonl: str | None = None) -> list[dict]:
    from .. import compile_report

    children = [p for p in providers if p in CHILD]
    providers = tuple(p for p in providers if p not in CHILD)
    model = build_qlora(shape, torch.device("cuda"))
    rows, base = [], stamp()
    torch._dynamo.reset()
    for provider in providers:
        set_provider(model, provider)
        common = {**base, "bench": "compile", "shape": shape, "provider": provider}
        if "train" in modes:
            res = measure_train(model, batch=batch, seq=seq, steps=steps)
            rows.append({**common, "mode": "train", "batch": batch, "seq": seq, **res,
                         **_graphs(compile_report(model), provider)})
            _emit(rows[-1], jsonl)
    if "numerics" in modes:
        rows += numerics_rows(model, providers, prompt=prompt, steps=new_tokens, base=base, shape=shape, jsonl=jsonl)
    if "infer" in modes:
        results = measure_infer_interleaved(model, providers, prompt=prompt, new_tokens=new_tokens, runs=runs)
        for provider in providers:
            set_provider(model, provider)
            rows.append({**base, "bench": "compile", "shape": shape, "provider": provider, "mode": "infer",
                         "prompt": prompt, "new_tokens": new_tokens, "runs": runs, "interleaved": True,
                         **results[provider], **_graphs(compile_report(model), provider)})
            _emit(rows[-1], jsonl)
        for provider in children:
            rows.append({**base, "bench": "compile", "shape": shape, "provider": provider, "mode": "infer",
                         "prompt": prompt, "new_tokens": new_tokens, "runs": runs,
                         **infer_child(provider, shape, prompt=prompt, new_tokens=new_tokens, runs=runs)})
            _emit(rows[-1], jsonl)
    set_provider(model, "eager")
    for mode, key in (("train", "tokens_per_s"), ("infer", "generate_ms")):  # numerics rows have their own floor
        ref = next((r for r in rows if r["mode"] == mode and r["provider"] == "eager"), None)
        for r in rows:
            if r["mode"] == mode and ref is not None and key in r:
                # speedup > 1 is better for both: tokens/s ratio, or eager latency / latency
                r["speedup_vs_eager"] = (r[key] / ref[key]) if mode == "train" else (ref[key] / r[key])
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def infer_child(provider: str, shape: str, *, prompt: int, new_tokens: int, runs: int, batch: int = 1) -> dict:
    """A child provider's inference row (``{"error": ...}`` when it fails or is not installed)."""
    from .train import spawn_command, unavailable

    why = unavailable(provider)
    if why is not None:
        return {"error": why}
    cmd = ["--worker", provider, "--shapes", shape, "--prompt", str(prompt), "--new-tokens", str(new_tokens),
           "--runs", str(runs), "--batch", str(batch)]
    return spawn_command("fastllm.bench.compile", cmd, provider, timeout=900)


def infer_worker(provider: str, shape: str, *, prompt: int, new_tokens: int, runs: int, batch: int = 1) -> dict:
    """In the child: Unsloth's model on the same weights, ``for_inference``, then the same timing as the others."""
    from .unsloth_provider import build

    model, note = build(shape, torch.device("cuda"), prompt + new_tokens + 64, gc=False)
    from unsloth import FastLanguageModel

    FastLanguageModel.for_inference(model)
    x, gen = infer_inputs(model, prompt, new_tokens, batch)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        first = sync_time(lambda: model.generate(input_ids=x, **gen))
    torch.cuda.reset_peak_memory_stats()
    samples = [infer_once(model, x, gen) for _ in range(runs)]
    return {**infer_row(first, [a for a, _ in samples], [b for _, b in samples], new_tokens), "setup": note}


def numerics_rows(model, providers, *, prompt: int, steps: int, base: dict, shape: str, jsonl: str | None) -> list:
    """Decode numerics (``bench.numerics``): each provider's teacher-forced logits against eager's, next to the
    floor (eager static vs dynamic cache), with the adapters' B ~ N(0, 0.02) so the LoRA terms count."""
    from .numerics import init_lora_b, teacher_forced

    init_lora_b(model)
    names = ["eager+static"] + [("fastllm:decode_graphs=false" if p == "fastllm-nographs" else p)
                                for p in providers if p.startswith("fastllm") and "compile" not in p]
    rows = []
    for provider, res in teacher_forced(model, names, prompt=prompt, steps=steps).items():
        rows.append({**base, "bench": "compile", "shape": shape, "provider": provider, "mode": "numerics",
                     "prompt": prompt, "steps": steps, **res})
        _emit(rows[-1], jsonl)
    return rows


def _graphs(rep, provider: str) -> dict:
    """The compile counters, on the compiled provider's rows only (the model keeps its regions' counts when
    unpatched, which would read as if the other rows had compiled)."""
    if rep is None or not provider.startswith("fastllm+compile"):
        return {}
    return {"graphs": rep.graphs, "graph_breaks": rep.graph_breaks, "recompiles": rep.recompiles,
            "backend_compile_s": rep.compile_seconds}


def _plots(rows: list[dict], out: str) -> None:
    groups = sorted({r["shape"] for r in rows})
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    for mode, key, label in (("train", "tokens_per_s", "training tokens/s"),
                             ("infer", "generate_ms", "prefill + 128-token decode, ms")):
        if not any(r["mode"] == mode for r in rows):
            continue
        series = {p: [next((r[key] for r in rows if r["mode"] == mode and r["provider"] == p and r["shape"] == g),
                           0.0) for g in groups] for p in provs}
        bar_chart(groups, series, title=f"QLoRA Llama-3 shapes, {mode} ({rows[0].get('gpu', '?')})", ylabel=label,
                  path=os.path.join(out, f"compile_{mode}.png"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastllm bench compile", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-out", help="directory for compile.jsonl and compile_*.png")
    p.add_argument("--quick", action="store_true", help="shorter sequences and fewer repetitions (a smoke run)")
    p.add_argument("--shapes", default="1b,8b", help="comma-separated, from: 1b,8b (tiny: CPU smoke)")
    p.add_argument("--providers", default="eager,fastllm,fastllm+compile")
    p.add_argument("--modes", default="train,infer", help="train, infer, numerics (comma-separated)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    for name in ("--prompt", "--new-tokens", "--runs", "--batch"):
        p.add_argument(name, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # a child provider (CHILD): one inference row on stdout
        row = infer_worker(args.worker, args.shapes, prompt=args.prompt, new_tokens=args.new_tokens, runs=args.runs,
                           batch=args.batch or 1)
        print("ROW " + json.dumps(row), flush=True)
        return 0
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - {"train", "infer", "numerics"}:
        p.error(f"--modes takes train, infer and/or numerics, got {args.modes!r}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    providers = pick(p, args.providers, PROVIDERS, "provider")
    shapes = pick(p, args.shapes, sorted(SHAPES), "shape")
    kw = dict(batch=2, seq=1024, steps=3, prompt=256, new_tokens=128, runs=3) if args.quick else \
        dict(batch=2, seq=2048, steps=10, prompt=512, new_tokens=128, runs=3)
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "compile.jsonl")  # rows are appended as each one finishes
    rows = []
    for shape in shapes:
        rows += run(shape, providers=providers, modes=modes, jsonl=jsonl, **kw)
    cols = {"train": ["shape", "provider", "tokens_per_s", "step_ms", "peak_gib", "compile_s", "graphs",
                      "graph_breaks", "speedup_vs_eager"],
            "infer": ["shape", "provider", "prefill_ms", "decode_ms_per_token", "generate_ms", "peak_gib",
                      "first_generate_s", "graphs", "graph_breaks", "speedup_vs_eager"]}
    cols["numerics"] = ["shape", "provider", "rel_err", "rel_err_max", "argmax_agree", "vs_floor"]
    for mode, columns in cols.items():
        if any(r["mode"] == mode for r in rows):
            print(f"\n{mode}\n" + format_table([r for r in rows if r["mode"] == mode], columns))
    _plots([r for r in rows if r["mode"] != "numerics"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
