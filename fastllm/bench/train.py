"""``fastllm bench train``: the headline QLoRA training-step benchmark, providers side by side.

One QLoRA step = forward + backward + AdamW on the LoRA weights (r=16 on all 7 linears, gradient
checkpointing, bf16 autocast and, on CUDA, the fused AdamW, as HF Trainer runs them: its default ``optim`` is
``adamw_torch_fused``), batch 2 x 2048 random tokens, ``--steps`` timed steps
after ``--warmup``. Providers, each in its own fresh process (some patch process-wide):

- ``hf``: transformers + PEFT + bitsandbytes, ``prepare_model_for_kbit_training`` (the QLoRA recipe),
  non-reentrant checkpointing, SDPA.
- ``hf-bf16``: transformers + PEFT + bitsandbytes without the fp32 upcasts (fastllm's precision).
- ``liger``: the same plus Liger-Kernel's patch for the architecture (rope, RMSNorm, SwiGLU, fused linear CE), if
  installed.
- ``unsloth``: Unsloth's ``FastLanguageModel`` and its ``"unsloth"`` checkpointing on the same weights (see
  ``unsloth_provider``), when ``$UNSLOTH_SITE`` holds it (``examples/unsloth_env.sh``); ``unsloth:compile=0``
  with its torch.compile off (``UNSLOTH_COMPILE_DISABLE=1``).
- ``fastllm``: ``fastllm.patch`` + ``FastLlama.get_peft_model`` as a user gets them (no fp32 upcasts, checkpointing
  ``"auto"`` under the device's budget); ``fastllm:opt=0,...`` runs an ablation with those PatchConfig options
  (``0``/``1``/``none``/a number): ``fastllm:gradient_checkpointing=1`` recomputes every layer,
  ``fastllm:memory_budget=7.0`` plans under 7 GiB.

Rows (tokens/s, peak GiB, loss after the timed steps) go to JSON lines with the GPU name and versions,
plus a table with ratios vs ``hf`` (and ``liger``, ``unsloth``) and a PNG. ``--profile`` adds, per provider,
the GPU's busy time per step and a text file: top ops by device and host time, where the GPU waits on the host
(idle time by step phase and by the op around each late launch, ``bench.idle``), a cProfile of two steps and
the host-device synchronisations of one step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from .common import bar_chart, format_table, stamp, write_jsonl
from .models import build_qlora_base, lora_targets

PROVIDERS = ("hf", "liger", "unsloth", "fastllm")
UNSLOTH = ("unsloth", "unsloth:compile=0")  # Unsloth's loader, in its own site; the second without its compile


def split_providers(text: str) -> list[str]:
    """``hf,fastllm:compile=1,lora=0`` -> ``["hf", "fastllm:compile=1,lora=0"]``:
    an item with ``=`` and no ``:`` is one more option of the provider before it."""
    out: list[str] = []
    for item in filter(None, text.split(",")):
        if out and "=" in item and ":" not in item and ":" in out[-1]:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def provider_error(text: str) -> str | None:
    """Why ``--providers`` names something no worker runs (an unknown name, or options on a provider that takes
    none), or None: a misspelt provider would otherwise run as ``hf`` under its own label."""
    for provider in split_providers(text):
        name, _, opts = provider.partition(":")
        if name == "fastllm" or provider in UNSLOTH or (name in PROVIDERS + ("hf-bf16",) and not opts):
            continue
        return (f"unknown provider {provider!r}: take {', '.join(PROVIDERS + ('hf-bf16',))}, fastllm:OPTION=VALUE,... "
                f"or {UNSLOTH[1]}")
    return None


def _patch_config(provider: str):
    """``fastllm`` or ``fastllm:compile=0,nf4_linear=0`` (ablations: 0/1/none per PatchConfig option)."""
    from .. import PatchConfig

    _, _, opts = provider.partition(":")
    values = {"0": False, "1": True, "none": None}
    kwargs = {}
    for item in filter(None, opts.split(",")):
        key, _, val = item.partition("=")
        kwargs[key] = values.get(val.lower(), _number(val))
    return PatchConfig(**kwargs)


def _number(text: str):
    """``"7.0"`` -> 7.0 (``memory_budget=7.0``); anything else as it is."""
    try:
        return float(text)
    except ValueError:
        return text


def _build(provider: str, shape: str, dev: torch.device, gc: bool, seq: int):
    """The provider's trainable model and a note on its setup: build_qlora_base, then its recipe."""
    if provider in UNSLOTH:  # the same weights through Unsloth's own loader
        from .unsloth_provider import build

        return build(shape, dev, seq, gc, compile=provider == "unsloth")
    return _prepare(provider, build_qlora_base(shape, dev), gc)


def _prepare(provider: str, model, gc: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if provider.startswith("fastllm"):
        from .. import FastLlama, patch

        cfg = _patch_config(provider)
        report = patch(model, cfg)
        # get_peft_model's argument decides checkpointing: its default ("auto") unless the provider names one
        use_gc = (cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else "auto") if gc else False
        budget = cfg.memory_budget if use_gc == "auto" else None
        return FastLlama.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=use_gc,
                                        memory_budget=budget), str(report)
    if provider == "hf-bf16":  # no fp32 upcasts: the same precision as fastllm, to compare losses
        from .._compat import enable_hf_checkpointing

        if gc:
            enable_hf_checkpointing(model)
        cfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets(model),
                         task_type="CAUSAL_LM")
        return get_peft_model(model, cfg), "bf16 residual stream, no prepare_model_for_kbit_training"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    note = "prepare_model_for_kbit_training"
    if provider == "liger":  # Liger's patch for the model's architecture (apply_liger_kernel_to_<model_type>)
        import liger_kernel.transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{model.config.model_type}")(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model)
        note += " + liger"
    cfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets(model), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg), note


def _profile(step, path: str, device: torch.device) -> float | None:
    """Two steps under torch.profiler; the top ops by device (or CPU) time go to ``path`` as a table.

    Returns the GPU's busy time per step in ms (the sum of all kernels' own time), None without a GPU:
    a step much longer than that is bound by the host, not the GPU."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages()
    with open(path, "w") as f:
        f.write(table.table(sort_by=key, row_limit=40))
        # A step whose wall time exceeds its device time is host-bound: show where the host goes too.
        f.write("\n\nby host (self CPU) time\n")
        f.write(table.table(sort_by="self_cpu_time_total", row_limit=25))
        if device.type == "cuda":
            from .idle import idle_report

            f.write("\n\nGPU idle time, charged to the host's work at the late launch\n")
            try:
                f.write(idle_report(prof, steps=2))
            except Exception as exc:  # a diagnostic: never lose the row for it
                f.write(f"not measured: {exc!r}\n")
        f.write("\n\nPython functions, 2 steps under cProfile (no torch.profiler), by own time\n")
        f.write(_python_profile(step, device))
        if device.type == "cuda":
            f.write("\n\nHost-device synchronisations in one step (each one drains the GPU's queue)\n")
            try:
                f.write(_sync_points(step))
            except Exception as exc:  # a diagnostic: never lose the row for it
                f.write(f"not measured: {exc!r}\n")
    if device.type != "cuda":
        return None
    # Kernel rows only: an op row (aten::mm) carries its kernels' time as its own "self" device time too,
    # so summing every row counted each kernel twice; record_function ranges show on the device as annotations.
    from torch.autograd import DeviceType

    busy_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
                  for e in table if e.device_type == DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", e.key.startswith("phase:")))
    return busy_us / 2 / 1000


def _sync_points(step) -> str:
    """Where one step synchronises the host with the GPU (``torch.cuda.set_sync_debug_mode``): a count per
    call site. A step without them keeps the GPU's queue full whenever the host is ahead on average."""
    import traceback
    import warnings
    from collections import Counter

    sites = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename][-4:]
        sites[" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames))] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    lines = [f"{n:5d}  {site}" for site, n in sites.most_common(25)]
    return f"{sum(sites.values())} synchronising calls\n" + "\n".join(lines) + "\n"


def _python_profile(step, device: torch.device) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(35)
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
    return buf.getvalue()


def run_worker(provider: str, shape: str, *, steps: int, warmup: int, batch: int, seq: int, device: str,
               gc: bool = True, profile_path: str | None = None) -> dict:
    """Build, prepare and time one provider; returns its row (and a profile table if ``profile_path``)."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    model, note = _build(provider, shape, dev, gc, seq)
    build_s = time.perf_counter() - t0
    vocab = model.config.get_text_config().vocab_size
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    # HF Trainer's default optimizer (adamw_torch_fused); the same for every provider
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    model.train()

    phase = torch.profiler.record_function  # markers for --profile's idle report (a no-op cost otherwise)

    def step():
        with phase("phase:forward"), torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        with phase("phase:backward"):
            loss.backward()
        with phase("phase:optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync()
    secs = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    gpu_busy_ms = _profile(step, profile_path, dev) if profile_path else None
    from ..patching.api import patch_report

    live = getattr(patch_report(model), "live", {}).get("gradient_checkpointing")  # None: not patched
    if live is not None:  # "auto": the plan its last pass ran
        note += f"; checkpointing {live.summary()}"
    return {"bench": "train", "provider": provider, "shape": shape, "batch": batch, "seq": seq, "steps": steps,
            "tokens_per_s": batch * seq * steps / secs, "step_ms": 1000 * secs / steps, "peak_gib": peak,
            "gpu_busy_ms": gpu_busy_ms,  # with --profile on a GPU: kernel time per step (step_ms >> it: host-bound)
            "loss": float(losses[-1]), "build_s": build_s, "setup": note, **stamp()}


def cap_memory(gib: float, device: str) -> None:
    """Let this process allocate at most ``gib`` GiB on the CUDA ``device`` (a smaller card on a large one)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise SystemExit("--memory-cap-gib needs a CUDA device")
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), dev)


def unavailable(provider: str) -> str | None:
    import importlib.util

    if provider == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel not installed"
    if provider in UNSLOTH:
        site = os.environ.get("UNSLOTH_SITE")
        if not site:
            return "UNSLOTH_SITE not set (source examples/unsloth_env.sh)"
        if not os.path.isdir(os.path.join(site, "unsloth")):
            return f"no unsloth package in UNSLOTH_SITE={site}"
    return None


def spawn_command(module: str, args: list[str], provider: str, *, timeout: float) -> dict:
    """Run ``python -m module *args`` and return the ``ROW {json}`` it prints, or ``{"error": last lines}`` (also
    when it runs past ``timeout`` seconds).
    The unsloth provider gets its own site first on the path: Unsloth pins trl<=1.15, older than the one here."""
    env = dict(os.environ)
    if provider in UNSLOTH:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["UNSLOTH_SITE"], env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired as err:  # a row like any failure: the other providers still run
        tail = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        last = " | ".join(tail.strip().splitlines()[-3:])
        return {"error": f"timed out after {timeout:g} s (raise --timeout)" + (f": {last}" if last else "")}
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    return {"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])}


def spawn_worker(provider: str, shape: str, args) -> dict:
    cmd = ["--worker", provider, "--shapes", shape, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device]
    if getattr(args, "memory_cap_gib", None) is not None:
        cmd += ["--memory-cap-gib", str(args.memory_cap_gib)]
    if args.profile:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"profile-{shape}-{provider}.txt")
        cmd += ["--profile", os.path.join(os.path.abspath(args.out), safe)]
    row = spawn_command("fastllm.bench.train", cmd, provider, timeout=args.timeout)
    if "error" in row:
        row = {"bench": "train", "provider": provider, "shape": shape, **row, **stamp()}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastllm bench train", description=__doc__.split("\n")[0])
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--profile", nargs="?", const="yes", default=None,
                   help="also write each provider's top ops (torch.profiler, 2 steps) to --out")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="cap the worker's CUDA memory (torch.cuda.set_per_process_memory_fraction): a smaller card")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.memory_cap_gib is not None:
            cap_memory(args.memory_cap_gib, args.device)
        row = run_worker(args.worker, args.shapes, steps=args.steps, warmup=args.warmup, batch=args.batch,
                         seq=args.seq, device=args.device, profile_path=args.profile)
        print("ROW " + json.dumps(row), flush=True)
        return 0
    why = provider_error(args.providers)
    if why:
        p.error(why)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for shape in args.shapes.split(","):
        for provider in split_providers(args.providers):
            why = unavailable(provider)
            row = spawn_worker(provider, shape, args) if why is None else {"provider": provider, "shape": shape,
                                                                       "error": why}
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("provider", "shape", "tokens_per_s", "peak_gib", "loss",
                                                      "error")}), flush=True)
    for shape in args.shapes.split(","):
        base = next((r for r in rows if r["shape"] == shape and r["provider"] == "hf" and "error" not in r), None)
        # liger and unsloth numbers (the first of unsloth's rows that ran) as further baselines
        peers = {name: next((r for r in rows if r["shape"] == shape and r["provider"].partition(":")[0] == name
                             and "error" not in r), None) for name in ("liger", "unsloth")}
        for r in rows:
            if r["shape"] == shape and base and "error" not in r:
                r["speedup_vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["memory_vs_hf"] = r["peak_gib"] / base["peak_gib"]
            for name, peer in peers.items():
                if r["shape"] == shape and peer and "error" not in r:
                    r[f"speedup_vs_{name}"] = r["tokens_per_s"] / peer["tokens_per_s"]
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(rows, os.path.join(args.out, "train.jsonl"))
    ok = [r for r in rows if "error" not in r]
    print(format_table(ok, ["shape", "provider", "tokens_per_s", "step_ms", "gpu_busy_ms", "peak_gib", "loss",
                            "speedup_vs_hf", "memory_vs_hf", "speedup_vs_liger", "speedup_vs_unsloth"]))
    for r in rows:
        if "error" in r:
            print(f"{r['shape']} {r['provider']}: FAILED {r['error']}")
    if ok:
        groups = [f"{r['shape']} {r['provider']}" for r in ok]
        bar_chart(groups, {"tokens/s (k)": [r["tokens_per_s"] / 1e3 for r in ok],
                           "peak GiB": [r["peak_gib"] for r in ok]},
                  title=f"QLoRA step, batch {args.batch}x{args.seq}, {ok[0].get('gpu', args.device)}",
                  ylabel="k tokens/s | GiB", path=os.path.join(args.out, "train.png"))
    return 0 if ok else 1  # every provider failed: a script or CI job must see it


if __name__ == "__main__":
    sys.exit(main())
