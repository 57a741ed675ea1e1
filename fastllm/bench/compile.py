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
own static-cache generate; ``-nographs``: a fastllm provider with ``decode_graphs=False``.

Measured (H200, torch 2.11, transformers 5.17, ``--quick --shapes 1b --providers eager,fastllm+compile``, one
run, before the fix below): train 2x1024 eager 5,156 tok/s at 4.22 GiB, compiled 3,046 tok/s (0.59x) at
1.54 GiB, 25 s compile, 16 graphs, 14 graph breaks; generate (256 prompt + 128 tokens) eager 7.49 s, compiled
13.77 s (0.54x).

Cause, reproduced on the CPU with torch 2.11.0 + transformers 5.17.0 + peft 0.21.0 on the tiny QLoRA model
of tests/modules/test_compile.py (18 graph breaks over 5 training lengths, 40 after a ``generate``): dynamo
2.11 traces *through* the ``functools.cache``'d ``fastllm._compat.bnb()`` probe in ``nf4_linear4bit_forward``
and breaks at ``importlib.util.find_spec`` (marked skipped), once per 4-bit linear; each resumed frame then
guards on its ``Params4bit``'s ``quant_state.shape`` and recompiles per projection shape until dynamo's
recompile limit, so whole regions ran eagerly. Fixed: with compile on, the 4-bit linears get
``nf4_linear4bit_compiled_forward``, which reads plain-tensor ``NF4Args`` (refreshed eagerly before each
region) and never bitsandbytes objects. On the CPU, torch 2.11 and 2.13 alike: 0 graph breaks; 3 graphs (one
per region) for training over 10 lengths, 11 after a ``generate``. Not yet measured on a GPU. The auto gate
stays at torch >= 2.13 until a GPU run shows compiled >= 1.1x eager on torch 2.11.

Re-measured after the fix (session 2, H200, torch 2.11, ``fastllm bench train`` rows, batch 2 x 2048, bf16
autocast, same run per shape): 8B ``fastllm:compile=1`` 9,472 tokens/s vs 8,312 eager-patched (1.14x) vs
7,669 ``hf-bf16``, 7.9 GiB; 1B 17,104 vs 18,510 (0.92x: at 1B the compiled regions lose to the hand-written
Triton RMSNorm/SwiGLU kernels). ``tests/test_gpu_compile.py`` on the GPU: compiled vs eager LoRA gradients
within 2.1% (1B-wide layers, bf16), 10-step curves within 0.01. Inference was not measured: a 150 s budget
ended inside the 1B eager ``generate`` runs, so rows are now printed and appended as each one finishes.

Session 3 (H200 on a slower host, ``--quick``): inference 1B eager 7.15 s, fastllm 7.67 s, compiled 6.14 s
(1.17x); 8B eager 11.28 / 8.95 s (two runs), fastllm 17.97 / 14.80 s, compiled 15.19 / 17.76 s (0.74x / 0.50x):
decode is host-bound and eager's one-token 4-bit linears take bnb's GEMV (~40 us host) where fastllm's op took
~130 us (the eager patch now defers those calls to bnb; the compiled regions do not yet). Training 1B (2 x
1024): eager 7,889 tokens/s, fastllm 5,349, compiled 7,916.

Session 6: one-token calls of the compiled regions' NF4 op go to bitsandbytes' own ``gemm_4bit`` kernel (bnb's
no-grad ``matmul_4bit`` path): 8B ``--quick --modes infer`` eager 15.45 s, compiled 11.94 s (1.29x), 0 graph
breaks. Training was not re-measured; the eager default now runs fused QLoRA decoder layers (``fused_layer``).

Session 7 (H200, torch 2.11, ``--quick``), one row group per run: training 1B eager 8,803 tokens/s, fastllm
18,811, compiled 10,012 (1.14x eager); 8B eager 3,230, fastllm 8,983, compiled 4,944 (1.53x); 3 graphs, 0 breaks,
0 recompiles. Inference 1B over four runs: compiled 1.12x, 0.68x, 1.10x and 0.86x eager; 8B 1.05x (1.29x in
session 6). Decode is host-bound and the compiled regions cost five guarded calls a layer a token, so compiled
inference swings with the host. ``compile`` is opt-in: the eager fused path trains 1.8-1.9x faster.

Session 8 (H200, torch 2.11, ``--quick``, inference interleaved, median of 3): ``decode_graphs`` (auto-on for CUDA)
replays each decode step as a CUDA graph over a static KV cache. Training 1B eager 7,284 tokens/s, fastllm 15,925,
compiled 10,147 (1.39x eager); 8B 3,893 / 11,093 / 5,391 (1.38x). Generate 1B eager 8.35 s, fastllm 0.715 s, compiled
0.748 s (11.2x); 8B 8.76 / 1.345 / 1.456 s (6.0x); 0 graph breaks. Without graphs (``fastllm-nographs``) fastllm was
1.08x eager. Run 4, 1B: eager 4.46 s, ``eager+static`` (transformers' static cache, which it compiles with CUDA
graphs) 0.852 s, fastllm 0.565 s, compiled 0.587 s.

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
from .common import bar_chart, format_table, stamp, write_jsonl
from .models import SHAPES, build_qlora_base

logger = logging.getLogger(__name__)
GiB = 1 << 30

def build_qlora(shape: str, device: torch.device, dtype=torch.bfloat16):
    """A random Llama-3-shaped NF4 model (``bench.models``) with LoRA r16 on all 7 linears (a PeftModel)."""
    from .. import FastLlama

    model = build_qlora_base(shape, device, dtype=dtype)
    gc.collect()
    return FastLlama.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=True)


PROVIDERS = ("eager", "eager+static", "fastllm", "fastllm+compile", "fastllm-nographs", "fastllm+compile-nographs")


def _set_provider(model, provider: str) -> None:
    from .. import PatchConfig, patch, unpatch

    unpatch(model)
    name, _, suffix = provider.partition("-")  # "...-nographs": decode steps without CUDA graphs
    if name in ("fastllm", "fastllm+compile"):
        patch(model, PatchConfig(compile=name == "fastllm+compile", gradient_checkpointing=True,
                                 decode_graphs=False if suffix == "nographs" else None))


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_train(model, *, batch: int, seq: int, steps: int) -> dict:
    vocab = model.config.vocab_size
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

    first = _sync_time(step)
    torch.cuda.reset_peak_memory_stats()
    times = [_sync_time(step) for _ in range(steps)]
    med = statistics.median(times)
    return {"tokens_per_s": batch * seq / med, "step_ms": med * 1e3, "first_step_s": first,
            "compile_s": max(first - med, 0.0), "peak_gib": torch.cuda.max_memory_allocated() / GiB}


def _infer_inputs(model, prompt: int, new_tokens: int):
    x = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda")
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    return x, gen


def _gen_of(provider: str, gen: dict) -> dict:
    """``eager+static``: transformers' own fast generate, a static cache (which makes ``generate`` torch.compile the
    forward with CUDA graphs, ``reduce-overhead``, where transformers finds it compileable)."""
    return {**gen, "cache_implementation": "static"} if provider == "eager+static" else gen


def _infer_once(model, x, gen) -> tuple[float, float]:
    """(prefill seconds, generate seconds) of one measurement: eval, no grad, bf16 autocast."""
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        prefill = _sync_time(lambda: model(input_ids=x, use_cache=True))
        total = _sync_time(lambda: model.generate(input_ids=x, **gen))
    return prefill, total


def _infer_row(first: float, prefills: list, totals: list, new_tokens: int) -> dict:
    prefill, total = statistics.median(prefills), statistics.median(totals)
    return {"prefill_ms": prefill * 1e3, "generate_ms": total * 1e3, "generate_ms_min": min(totals) * 1e3,
            "generate_ms_max": max(totals) * 1e3, "decode_ms_per_token": (total - prefill) * 1e3 / new_tokens,
            "first_generate_s": first, "peak_gib": torch.cuda.max_memory_allocated() / GiB}


def measure_infer_interleaved(model, providers, *, prompt: int, new_tokens: int, runs: int) -> dict:
    """``measure_infer`` for every provider, the runs interleaved (provider 1, 2, 3, 1, 2, 3...): decode is
    host-bound, and a host's speed drifts by 10-40% within minutes, which one provider's block of runs would
    take for a difference between providers. Compiled regions keep their graphs between rounds."""
    x, gen = _infer_inputs(model, prompt, new_tokens)
    first, samples, peaks, notes = {}, {p: [] for p in providers}, {}, {}
    for p in providers:  # warm-up (compiles) once per provider
        _set_provider(model, p)
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            kw = _gen_of(p, gen)
            first[p] = _sync_time(lambda: model.generate(input_ids=x, **kw))  # noqa: B023 - called right here
    for _ in range(runs):
        for p in providers:
            _set_provider(model, p)
            torch.cuda.reset_peak_memory_stats()
            samples[p].append(_infer_once(model, x, _gen_of(p, gen)))
            peaks[p] = max(peaks.get(p, 0.0), torch.cuda.max_memory_allocated() / GiB)
            report = patch_report(model)
            graphs = report.live.get("decode_graphs") if report is not None else None
            if graphs is not None:  # this round's decode steps: captured, replayed, eager and why
                notes[p] = graphs.summary()
    rows = {}
    for p in providers:
        rows[p] = _infer_row(first[p], [a for a, _ in samples[p]], [b for _, b in samples[p]], new_tokens)
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

    model = build_qlora(shape, torch.device("cuda"))
    rows, base = [], stamp()
    torch._dynamo.reset()
    for provider in providers:
        _set_provider(model, provider)
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
            _set_provider(model, provider)
            rows.append({**base, "bench": "compile", "shape": shape, "provider": provider, "mode": "infer",
                         "prompt": prompt, "new_tokens": new_tokens, "runs": runs, "interleaved": True,
                         **results[provider], **_graphs(compile_report(model), provider)})
            _emit(rows[-1], jsonl)
    _set_provider(model, "eager")
    for mode, key in (("train", "tokens_per_s"), ("infer", "generate_ms")):  # numerics rows have their own floor
        ref = next((r for r in rows if r["mode"] == mode and r["provider"] == "eager"), None)
        for r in rows:
            if r["mode"] == mode and ref is not None:
                # speedup > 1 is better for both: tokens/s ratio, or eager latency / latency
                r["speedup_vs_eager"] = (r[key] / ref[key]) if mode == "train" else (ref[key] / r[key])
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def numerics_rows(model, providers, *, prompt: int, steps: int, base: dict, shape: str, jsonl: str | None) -> list:
    """Decode numerics (``bench.numerics``): each provider's teacher-forced logits against eager's, next to the
    floor (eager static vs dynamic cache), with the adapters' B ~ N(0, 0.02) so the LoRA terms count."""
    from .numerics import teacher_forced

    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
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
    args = p.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - {"train", "infer", "numerics"}:
        p.error(f"--modes takes train, infer and/or numerics, got {args.modes!r}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    providers = tuple(p for p in args.providers.split(",") if p)
    bad = sorted(set(providers) - set(PROVIDERS))
    if bad:
        p.error(f"unknown provider(s) {bad}; choose from {', '.join(PROVIDERS)}")
    shapes = [s for s in args.shapes.split(",") if s]
    bad = sorted(set(shapes) - set(SHAPES))
    if bad:
        p.error(f"unknown shape(s) {bad}; choose from {sorted(SHAPES)}")
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
