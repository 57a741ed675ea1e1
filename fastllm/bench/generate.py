"""``fastllm bench generate``: QLoRA generation at decode batch sizes, next to the memory-bandwidth limit (GPU).

One random QLoRA model per shape (``bench.compile.build_qlora``: NF4 double quant, LoRA r16 on all linears; the
adapters' B drawn N(0, 0.02) so their terms count), greedy ``generate`` of ``new_tokens`` after a ``prompt``-token
prompt for each batch size, bf16 autocast. Providers, the runs interleaved per batch size:

- ``hf``: transformers + PEFT + bitsandbytes as they come, dynamic cache;
- ``hf+static``: the same with transformers' static cache (which compiles the forward where it can);
- ``fastllm``: fastllm's defaults (decode graphs over a static cache; fastllm's NF4 GEMV for 1 to 32 rows, the LoRA
  terms fused, q/k/v and gate/up one launch each; dequant + GEMM for more rows);
- ``fastllm:gemv=off``: the same with the GEMV switched off (``ops.nf4_gemv.set_enabled(False)``): bitsandbytes'
  GEMV for one row, dequant + GEMM for batches, the LoRA terms grouped per input;
- ``fastllm:rows=N`` (8, 16, 64): the defaults with the GEMV taking decode steps of up to N rows
  (``ops.nf4_gemv.set_decode_rows``), to time larger batches through it;
- ``fastllm:xa=fused``: the defaults with the adapters' ``xa`` from ``kernels.lora_xa`` (one launch a group, from the
  fp32 masters) instead of a cast and a cuBLAS GEMM (``ops.lora.set_fused_xa(True)``); ``fastllm:base``: the defaults
  with one-token attention through transformers' SDPA function as given (``modules.decoder.set_grouped_decode``);
  ``fastllm:pdl``: the decode kernels launched with programmatic dependent launch (``kernels.pdl.set_pdl``), and
  ``fastllm:xa=fused+pdl`` both; ``fastllm:lut``: every GEMV on the byte-permute codes (``LUT_CONFIG``);
  ``fastllm:finish``: split-K GEMVs finished by each tile's last K range, no epilogue launch (``FINISH``);
  ``fastllm:sync``: the stop check read after every token as transformers reads it
  (``modules.deferred_stop.set_deferred_stop(False)``; by default fastllm reads it one step late on CUDA);
- ``fastllm:dense``: the same with ``ops.dense_decode`` (dense copies of the 4-bit weights for the length of each
  generate call: every step one cuBLAS GEMM over 2 bytes a weight; its peak shows their memory);
- ``unsloth``: Unsloth's ``FastLanguageModel.for_inference`` on the same weights, in a child process.

Per row: ms per decode step ((generate - prefill) / new_tokens), tokens/s (batch * new_tokens / generate),
peak GiB, and ``limit_ms``: the bytes one decode step must read (every 4-bit weight with its absmax, the adapters,
the bf16 lm_head and norms, the KV cache at the mean context) over this GPU's measured copy bandwidth; ``of_limit``
= limit_ms / decode ms. JSON lines and a PNG of ms per step against batch size.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch

from .common import copy_bandwidth_gbs, finish_figure, format_table, pick, stamp, write_jsonl
from .compile import build_qlora, infer_child, infer_once, infer_row, set_provider, sync_time
from .models import SHAPES

GROUP_COLUMNS = ["group", "us_per_step", "calls_per_step", "share"]  # one decode step's kernel groups (--profile)
PROVIDERS = ("hf", "hf+static", "fastllm", "fastllm:gemv=off", "fastllm:rows=8", "fastllm:rows=16", "fastllm:rows=64",
             "fastllm:xa=fused", "fastllm:pdl", "fastllm:xa=fused+pdl", "fastllm:lut", "fastllm:xa=fused+pdl+lut",
             "fastllm:finish", "fastllm:xa=fused+pdl+finish", "fastllm:xa=fused+pdl+lut+finish",
             "fastllm:sync", "fastllm:base", "fastllm:dense",
             "unsloth")


# ``fastllm:...+lut``: every GEMV row count on the byte-permute codes (UNPACK 5; fewest instructions a weight in
# ``bench sass``), tensor cores, 128 weight rows x one quantization block a step
LUT_CONFIG = {"DOT": True, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "UNPACK": 5, "STEPS": 8}
_TILES: dict = {}


def _tiles(lut: bool, finish: bool) -> None:
    """The GEMV's tile configs as they were at the first provider switch (the defaults, or a sweep's picks), or
    those with ``LUT_CONFIG`` over them (``lut``), split K finished by the last K range (``finish``)."""
    from ..kernels import nf4_gemv as kernels

    if not _TILES:
        _TILES.update({name: dict(getattr(kernels, name)) for name in ("ROW_CONFIG", "ROWS_CONFIG", "DOT_CONFIG")})
    for name, saved in _TILES.items():
        target = getattr(kernels, name)
        target.clear()
        target.update({**saved, **(LUT_CONFIG if lut and name != "ROWS_CONFIG" else {}),
                       **({"FINISH": True} if finish else {})})


def _select(model, provider: str) -> dict:
    """Patch or unpatch ``model`` for ``provider``; the generate kwargs it runs with. A fastllm provider's options
    follow the colon, joined by ``+`` (``fastllm:xa=fused+pdl``)."""
    from ..kernels.pdl import set_pdl
    from ..modules.decoder import set_grouped_decode
    from ..modules.deferred_stop import set_deferred_stop
    from ..ops import dense_decode
    from ..ops.lora import set_fused_xa
    from ..ops.nf4_gemv import set_decode_rows, set_enabled

    opts = set(provider.split(":", 1)[1].split("+")) if provider.startswith("fastllm:") else set()
    set_enabled(False if "gemv=off" in opts else None)
    set_decode_rows(next((int(o.split("=")[1]) for o in opts if o.startswith("rows=")), None))
    dense_decode.set_enabled(True if "dense" in opts else None)
    set_fused_xa("xa=fused" in opts)
    set_pdl("pdl" in opts)
    _tiles("lut" in opts, "finish" in opts)
    set_deferred_stop(False if "sync" in opts else None)
    set_grouped_decode(False if "base" in opts else None)
    set_provider(model, "fastllm" if provider.startswith("fastllm") else "eager")
    return {"cache_implementation": "static"} if provider == "hf+static" else {}


def step_bytes(model, batch: int, context: int) -> int:
    """Bytes a decode step reads at least: parameters the step touches once (4-bit weights and their quant state,
    adapters, lm_head, norms; one embedding row per sequence) plus the K and V cache up to ``context`` tokens."""
    import bitsandbytes as bnb

    total = 0
    emb = model.get_input_embeddings().weight
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            total += m.weight.numel() * m.weight.element_size() + qs.absmax.numel() * qs.absmax.element_size()
    for name, p in model.named_parameters():
        if p is emb or "base_layer" in name or isinstance(p, bnb.nn.Params4bit):
            continue
        total += p.numel() * p.element_size()
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2  # K and V, bf16, per token
    return total + batch * (emb.shape[1] * emb.element_size() + context * kv)


def _profiled(model, x, kw):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.generate(input_ids=x, **kw)
        torch.cuda.synchronize()
    return prof


def _profile(model, x, kw, path: str) -> tuple[list[dict], float | None]:
    """Two generates under torch.profiler, of ``kw``'s new tokens and of one: to ``path`` the long one's kernels by
    device time (graph replays' kernels included) and, from the difference, one decode step's device time by kernel
    group (``kernel_groups.step_groups``: the prefill taken out), the device's idle gaps and the host's profile
    (``host_profile``); returns those rows."""
    from .kernel_groups import group_times, profiled_kernels, step_groups, step_kernels

    n = kw["max_new_tokens"]
    prof = _profiled(model, x, kw)
    short = _profiled(model, x, {**kw, "max_new_tokens": 1, "min_new_tokens": 1})
    long_k, short_k = profiled_kernels(prof), profiled_kernels(short)
    rows = step_groups(group_times(long_k), group_times(short_k), n)
    with open(path, "w") as f:
        f.write(f"one decode step's kernels by group ({n} new tokens less 1, over {n - 1} steps):\n")
        f.write(format_table(rows, GROUP_COLUMNS) + "\n\n")
        f.write(step_idle(prof, short, n) + "\n")
        kernels = [{**r, "kernel": r["kernel"][:110]} for r in step_kernels(long_k, short_k, n)]
        f.write(format_table(kernels, ["us_per_step", "calls_per_step", "group", "kernel"]) + "\n\n")
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60) + "\n\n")
        f.write(host_profile(model, x, kw))
    return rows


def host_profile(model, x, kw, top: int = 40) -> str:
    """Where the host's time goes in one generate of ``kw`` (cProfile: the functions by own time and by cumulative
    time): a decode step whose device idles between launches waits on this Python."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        prof.enable()
        model.generate(input_ids=x, **kw)
        torch.cuda.synchronize()
        prof.disable()
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(top)
    return out.getvalue()


def step_idle(prof, short, n: int, top: int = 15) -> str:
    """One decode step's device idle time: the difference of an ``n``-token and a 1-token generate's gaps, all of
    them (launch gaps inside a graph replay included) and those of 5 us or more (the device waiting on the host),
    the latter by the op around the late launch."""
    from .idle import idle_gaps

    lines, late = [], None
    for floor in (0.0, 5.0):
        a, b = idle_gaps(prof, floor, attribute=floor > 0), idle_gaps(short, floor, attribute=floor > 0)
        per, gaps = (a["total"] - b["total"]) / (n - 1), (a["gaps"] - b["gaps"]) / (n - 1)
        lines.append(f"device idle per decode step in gaps >= {floor:g} us: {per:.1f} us in {gaps:.1f} gaps")
        late = (a["by_op"], b["by_op"])  # the last floor's, attributed to the op around each late launch
    ops = {k: (v - late[1].get(k, 0.0)) / (n - 1) for k, v in late[0].items()}
    lines += [f"  {v:9.1f} us  {phase:<8} {op}" for (phase, op), v in sorted(ops.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines) + "\n"


def measure(model, providers, *, batch: int, prompt: int, new_tokens: int, runs: int, bandwidth: float,
            profile: str | None = None, profiled=None) -> list:
    """Rows of each provider's generate at ``batch``; with ``profile`` (a path prefix) one more generate each
    (of those in ``profiled``, default all) under torch.profiler (``_profile``)."""
    from .compile import infer_inputs
    from .numerics import init_lora_b

    init_lora_b(model)
    x, gen = infer_inputs(model, prompt, new_tokens, batch)
    gen["pad_token_id"] = 0
    first, samples, peaks = {}, {p: [] for p in providers}, {}
    for p in providers:  # a warm-up generate each (captures, compiles)
        kw = {**gen, **_select(model, p)}
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            first[p] = sync_time(lambda: model.generate(input_ids=x, **kw))  # noqa: B023 - called right here
    for _ in range(runs):
        for p in providers:
            kw = {**gen, **_select(model, p)}
            torch.cuda.reset_peak_memory_stats()
            samples[p].append(infer_once(model, x, kw))
            peaks[p] = max(peaks.get(p, 0.0), torch.cuda.max_memory_allocated() / (1 << 30))
    groups = {}
    for p in providers if profile and new_tokens > 1 else ():
        if profiled is not None and p not in profiled:
            continue
        groups[p] = _profile(model, x, {**gen, **_select(model, p)}, f"{profile}_{p.replace(':', '-')}_b{batch}.txt")
        print(f"{p}, batch {batch}: one decode step's kernels by group", flush=True)
        print(format_table(groups[p], GROUP_COLUMNS), flush=True)
    _select(model, "hf")
    limit_ms = step_bytes(model, batch, prompt + new_tokens // 2) / (bandwidth * 1e9) * 1e3
    rows = []
    for p in providers:
        row = infer_row(first[p], [a for a, _ in samples[p]], [b for _, b in samples[p]], new_tokens)
        rows.append({"provider": p, "batch": batch, **row, "peak_gib": peaks[p]})
        if p in groups:  # the JSON row keeps them, with the run's GPU and versions
            rows[-1]["step_kernel_us"] = {g["group"]: g["us_per_step"] for g in groups[p]}
    return [_finish(r, limit_ms, new_tokens) for r in rows]


def _finish(row: dict, limit_ms: float, new_tokens: int) -> dict:
    if "generate_ms" in row:
        row["tokens_per_s"] = row["batch"] * new_tokens / (row["generate_ms"] / 1e3)
        row["limit_ms"] = limit_ms
        row["of_limit"] = limit_ms / row["decode_ms_per_token"]
    return row


def run(shape: str, providers, *, batches, prompt: int, new_tokens: int, runs: int, jsonl: str | None,
        profile: str | None = None, profiled=None) -> list:
    base = {"bench": "generate", "shape": shape, "prompt": prompt, "new_tokens": new_tokens, **stamp()}
    bandwidth = copy_bandwidth_gbs()
    local = [p for p in providers if p != "unsloth"]
    model = build_qlora(shape, torch.device("cuda"))
    rows = []
    for batch in batches:
        found = measure(model, local, batch=batch, prompt=prompt, new_tokens=new_tokens, runs=runs,
                        bandwidth=bandwidth, profile=profile, profiled=profiled)
        if "unsloth" in providers:
            limit = found[0]["limit_ms"] if found else float("nan")
            row = {"provider": "unsloth", "batch": batch, **infer_child("unsloth", shape, prompt=prompt,
                                                                       new_tokens=new_tokens, runs=runs, batch=batch)}
            found.append(_finish(row, limit, new_tokens))
        for r in found:
            r.update(base, copy_gbs=bandwidth)
            print({k: r.get(k) for k in ("batch", "provider", "decode_ms_per_token", "tokens_per_s", "of_limit",
                                         "error")}, flush=True)
            if jsonl:
                write_jsonl([r], jsonl)
        rows += found
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def _weights(n: int, k: int) -> tuple:
    """A random (n, k) NF4 double-quant weight as (packed plain tensor, state_args, quant state), and enough
    copies of its packed bytes to stream from memory (``l2_copies``)."""
    import bitsandbytes as bnb

    from ..ops.nf4 import plain_tensor, state_args
    from .common import l2_copies

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    packed = plain_tensor(packed)
    return [packed.clone() for _ in range(l2_copies(packed.numel()))], state_args(qs), qs


def _projection_times(glu: bool, n: int, k: int, m: int) -> dict:
    """Milliseconds of one projection (or a gate/up pair, ``glu``) at ``m`` rows, replayed in a CUDA graph over
    weight copies (``graph_ms``): fastllm's GEMV with a LoRA r16 term, dequant + GEMM, and (one row)
    bitsandbytes' GEMV; the pair's baselines run each projection once (gate and up two different copies)."""
    from ..ops.nf4 import bnb_gemv, dequantize_nf4
    from ..ops.nf4_gemv import nf4_gemv, nf4_glu_gemv
    from .common import graph_ms

    copies, st, qs = _weights(n, k)
    pairs = [(copies[i], copies[(i + 1) % len(copies)]) for i in range(0, len(copies), 2)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xa = torch.randn(m, 32, device="cuda", dtype=torch.bfloat16)
    lora = (xa[:, :16], torch.randn(n, 16, device="cuda", dtype=torch.bfloat16) * 0.02, 2.0)
    if glu:
        ours = graph_ms([lambda g=g, u=u: nf4_glu_gemv(x, (g, st, lora), (u, st, lora)) for g, u in pairs])
    else:
        ours = graph_ms([lambda p=p: nf4_gemv(x, p, st, None, lora) for p in copies])
    times = {"fastllm": ours,
             "dequant+gemm": graph_ms([lambda p=p: x @ dequantize_nf4(p, qs).t() for p in copies]) * (1 + glu)}
    if m == 1:
        times["bnb"] = graph_ms([lambda p=p: bnb_gemv(x, p, *st[:5], None, st[5], st[7]) for p in copies]) * (1 + glu)
    return times


def _qkv_times(d: int, kv: int, m: int) -> dict:
    """Milliseconds of a layer's q, k and v at ``m`` rows, as ``_projection_times`` times one projection: fastllm's
    grouped GEMV (one launch, ``nf4_group_gemv``) against three launches of the baselines."""
    from ..ops.nf4 import bnb_gemv, dequantize_nf4
    from ..ops.nf4_gemv import nf4_group_gemv
    from .common import graph_ms

    qc, qst, qqs = _weights(d, d)
    kc, kst, kqs = _weights(kv, d)
    sets = [(qc[i % len(qc)], kc[i % len(kc)], kc[(i + 1) % len(kc)]) for i in range(max(len(qc), len(kc)))]
    x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    xa = torch.randn(m, 48, device="cuda", dtype=torch.bfloat16)
    loras = [(xa[:, 16 * j:16 * (j + 1)], torch.randn(n, 16, device="cuda", dtype=torch.bfloat16) * 0.02, 2.0)
             for j, n in enumerate((d, kv, kv))]
    ours = graph_ms([lambda q=q, k=k, v=v: nf4_group_gemv(x, [(q, qst, None, loras[0]), (k, kst, None, loras[1]),
                                                              (v, kst, None, loras[2])]) for q, k, v in sets])
    times = {"fastllm": ours, "dequant+gemm": graph_ms([
        lambda q=q, k=k, v=v: (x @ dequantize_nf4(q, qqs).t(), x @ dequantize_nf4(k, kqs).t(),
                               x @ dequantize_nf4(v, kqs).t()) for q, k, v in sets])}
    if m == 1:
        times["bnb"] = graph_ms([lambda q=q, k=k, v=v: (bnb_gemv(x, q, *qst[:5], None, qst[5], qst[7]),
                                                        bnb_gemv(x, k, *kst[:5], None, kst[5], kst[7]),
                                                        bnb_gemv(x, v, *kst[:5], None, kst[5], kst[7]))
                                 for q, k, v in sets])
    return times


def kernel_rows(shape: str, rows_list=(1, 8, 32)) -> list:
    """Per-projection GEMV times of one decoder layer of ``shape`` (random NF4 double-quant weights, LoRA r16):
    fastllm's kernels, bitsandbytes' GEMV (one row) and dequant + GEMM, each next to its packed bytes' limit."""
    from .models import shape_config

    cfg = shape_config(shape)
    d, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads)
    bandwidth = copy_bandwidth_gbs()
    out = []
    for name, n, k in (("q", d, d), ("k", kv, d), ("gate+up", i, d), ("down", d, i)):
        limit_ms = n * k // 2 * (1 + (name == "gate+up")) / (bandwidth * 1e9) * 1e3
        for m in rows_list:
            for provider, ms in _projection_times(name == "gate+up", n, k, m).items():
                out.append({"bench": "generate-kernels", "shape": shape, "proj": name, "rows": m,
                            "provider": provider, "us": ms * 1e3, "limit_us": limit_ms * 1e3,
                            "of_limit": limit_ms / ms})
        torch.cuda.empty_cache()
    limit_ms = (d + 2 * kv) * d // 2 / (bandwidth * 1e9) * 1e3
    for m in rows_list:
        for provider, ms in _qkv_times(d, kv, m).items():
            out.append({"bench": "generate-kernels", "shape": shape, "proj": "q+k+v", "rows": m, "provider": provider,
                        "us": ms * 1e3, "limit_us": limit_ms * 1e3, "of_limit": limit_ms / ms})
    torch.cuda.empty_cache()
    return out


# one row: the bytes mode (UNPACK 0; the words and lanes modes lost or tied at every tile) over tile shapes, K ranges
# per program and warps a program (num_stages leaves this loop's machine code unchanged: the same cubin for 1 and 3)
ROW_SWEEP = [{"DOT": False, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": 1, "UNPACK": 0, "STEPS": st}
             for bn, bk in ((16, 512), (16, 1024), (8, 1024), (32, 256)) for st in (1, 2, 4) for nw in (4, 8)]
# the codes by byte permutes (UNPACK 5: tensor cores, one quantization block a step), one row padded to 16
ROW_SWEEP += [{"DOT": True, "BLOCK_N": bn, "BLOCK_K": 64, "num_warps": nw, "num_stages": ns, "UNPACK": 5, "STEPS": st}
              for bn, nw in ((128, 4), (256, 8), (256, 4)) for ns, st in ((1, 4), (1, 8), (3, 8))]
# around the H100's best (128 rows, 4 warps, 3 stages, 8 steps): longer K ranges, deeper pipelines, smaller tiles
ROW_SWEEP += [{"DOT": True, "BLOCK_N": bn, "BLOCK_K": 64, "num_warps": nw, "num_stages": ns, "UNPACK": 5, "STEPS": st}
              for bn, nw, ns, st in ((128, 4, 3, 16), (128, 4, 4, 8), (128, 4, 4, 16), (64, 4, 3, 8), (128, 8, 3, 8))]
# the 16-entry table (UNPACK 0) next to the pair table: a pair-table gather can touch 16 cache lines a warp
DOT_SWEEP = [{"DOT": True, "BLOCK_N": bn, "BLOCK_K": 128, "num_stages": ns, "num_warps": 4, "UNPACK": u, "STEPS": st}
             for u, ns, bn, st in ((2, 3, 64, 8), (0, 3, 64, 8), (0, 1, 64, 8), (2, 3, 64, 2), (0, 1, 32, 2))]
DOT_SWEEP += [{"DOT": True, "BLOCK_N": bn, "BLOCK_K": 64, "num_stages": ns, "num_warps": nw, "UNPACK": 5, "STEPS": st}
              for bn, nw, ns, st in ((128, 4, 1, 8), (256, 8, 1, 8), (128, 4, 3, 4), (256, 4, 1, 4))]
ROWS_SWEEP = [{"DOT": False, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": 1, "UNPACK": 3, "STEPS": st}
              for bn, bk in ((8, 128), (4, 256), (8, 256)) for st in (2, 4)]
# split K finished by each tile's last K range instead of an epilogue launch: today's tiles and the permutes'
ROW_SWEEP += [{"DOT": False, "BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1, "UNPACK": 0, "STEPS": 2,
               "FINISH": True}, {**LUT_CONFIG, "FINISH": True}]
DOT_SWEEP += [{"DOT": True, "BLOCK_N": 64, "BLOCK_K": 128, "num_stages": 1, "num_warps": 4, "UNPACK": 0, "STEPS": 8,
               "FINISH": True}, {**LUT_CONFIG, "FINISH": True}]


def sweep_rows(shape: str, rows_list=(1, 8, 32)) -> list:
    """fastllm's GEMV (LoRA r16) over the tile alternatives (``ROW_SWEEP`` for one row, ``ROWS_SWEEP`` (CUDA cores)
    and ``DOT_SWEEP`` (tensor cores) for more) on
    one decoder layer's q and down projections of ``shape``, replayed in a CUDA graph over weight copies
    (``graph_ms``): microseconds per config, next to the packed bytes' limit. A config that fails to compile or
    run is a row with its error."""
    from ..ops.nf4_gemv import nf4_gemv
    from .common import graph_ms
    from .models import shape_config

    cfg = shape_config(shape)
    d, i = cfg.hidden_size, cfg.intermediate_size
    bandwidth = copy_bandwidth_gbs()
    out = []
    for name, n, k in (("q", d, d), ("down", d, i)):
        copies, st, _ = _weights(n, k)
        b = torch.randn(n, 16, device="cuda", dtype=torch.bfloat16) * 0.02
        limit_us = n * k // 2 / (bandwidth * 1e9) * 1e6
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            lora = (torch.randn(m, 16, device="cuda", dtype=torch.bfloat16), b, 2.0)
            for config in (ROW_SWEEP if m == 1 else ROWS_SWEEP + DOT_SWEEP):
                row = {"bench": "generate-sweep", "shape": shape, "proj": name, "rows": m, **config,
                       "limit_us": limit_us}
                try:
                    us = graph_ms([lambda p=p, c=config: nf4_gemv(x, p, st, None, lora, config=c)  # noqa: B023
                                   for p in copies]) * 1e3
                    row.update(us=us, of_limit=limit_us / us)
                except Exception as err:  # a config the compiler refuses (shared memory, registers) is a result too
                    row["error"] = " ".join(str(err).split())[:200]
                out.append(row)
        del copies
        torch.cuda.empty_cache()
    return out


def adopt_best(sweep: list[dict]) -> dict:
    """Set ``kernels.nf4_gemv.ROW_CONFIG`` / ``ROWS_CONFIG`` / ``DOT_CONFIG`` (for this process) to the sweep's
    fastest config of each path (one row; several on the CUDA cores; the tensor cores), by summed time over the
    projections and row counts it was timed at; a config must have run everywhere it was timed. ``ROWS_CONFIG``'s
    ``MAX_M`` becomes the largest swept row count at which the CUDA cores' best beat the tensor cores' (1: none).
    Returns ``{"row": config, "rows": config, "dot": config}``."""
    from ..kernels import nf4_gemv as kernels

    keys = ("DOT", "BLOCK_N", "BLOCK_K", "UNPACK", "STEPS", "num_warps", "num_stages", "FINISH")
    groups = {"row": (kernels.ROW_CONFIG, lambda r: r["rows"] == 1),
              "rows": (kernels.ROWS_CONFIG, lambda r: r["rows"] > 1 and not r.get("DOT", True)),
              "dot": (kernels.DOT_CONFIG, lambda r: r["rows"] > 1 and r.get("DOT", True))}
    chosen, picked = {}, {}
    for name, (target, mine) in groups.items():
        totals, failed = {}, set()
        for r in filter(mine, sweep):
            cfg = tuple((k, r[k]) for k in keys if k in r)
            if "us" not in r:
                failed.add(cfg)
            totals[cfg] = totals.get(cfg, 0.0) + r.get("us", 0.0)
        ok = {c: t for c, t in totals.items() if c not in failed}
        if ok:
            picked[name] = min(ok, key=ok.get)
            target.update(dict(picked[name]))
        chosen[name] = dict(target)

    def time_at(name: str, m: int) -> float:  # the picked config's summed time at m rows
        mine = groups[name][1]
        hits = [r["us"] for r in sweep if r["rows"] == m and mine(r) and name in picked
                and tuple((k, r[k]) for k in keys if k in r) == picked[name]]
        return sum(hits) if hits else float("inf")

    counts = sorted({r["rows"] for r in sweep if r["rows"] > 1})
    if counts:
        kernels.ROWS_CONFIG["MAX_M"] = max((m for m in counts if time_at("rows", m) < time_at("dot", m)), default=1)
        chosen["rows"]["MAX_M"] = kernels.ROWS_CONFIG["MAX_M"]
    return chosen


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for p in dict.fromkeys(r["provider"] for r in rows):
        pts = sorted((r["batch"], r["decode_ms_per_token"]) for r in rows
                     if r["provider"] == p and "decode_ms_per_token" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=p)
    limit = sorted({(r["batch"], r["limit_ms"]) for r in rows if "limit_ms" in r})
    if limit:
        ax.plot(*zip(*limit), linestyle="--", color="gray", label="bandwidth limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences decoded together)")
    finish_figure(fig, ax, title=f"{rows[0]['shape']} QLoRA decode ({rows[0].get('gpu', '?')})",
                  ylabel="ms per decode step", path=path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastllm bench generate", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-out", help="directory for generate.jsonl and generate_<shape>.png")
    p.add_argument("--shapes", default="8b", help=f"comma-separated, from: {', '.join(sorted(SHAPES))}")
    p.add_argument("--providers", default="hf,fastllm,fastllm:gemv=off,fastllm:dense,unsloth",
                   help=f"comma-separated, from: {', '.join(PROVIDERS)}")
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes ('' with --kernels / --sweep: none)")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--kernels", action="store_true", help="also time one layer's GEMVs (fastllm, bnb, dequant+GEMM)")
    p.add_argument("--sweep", action="store_true", help="also time the GEMV's tile alternatives (q and down)")
    p.add_argument("--sweep-rows", default="1,8,32", help="the row counts --sweep times")
    p.add_argument("--profile", nargs="?", const="all", default=None, metavar="PROVIDERS",
                   help="also profile each local provider (or those listed, comma-separated): one decode step's kernel "
                        "time by group and by kernel, its device idle time, and the kernels of one generate, to --out")
    args = p.parse_args(argv)
    providers = pick(p, args.providers, PROVIDERS, "provider")
    profiled = None
    if args.profile is not None:
        profiled = [q for q in providers if q != "unsloth"] if args.profile == "all" else \
            pick(p, args.profile, providers, "profiled provider")
    shapes = pick(p, args.shapes, sorted(SHAPES), "shape")
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches takes comma-separated integers, got {args.batches!r}")
    if batches and min(batches) < 1 or not (batches or args.kernels or args.sweep):
        p.error("--batches takes positive integers (empty only with --kernels or --sweep)")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "generate.jsonl")
    for shape in shapes:
        if args.sweep:
            srows = sweep_rows(shape, [int(r) for r in args.sweep_rows.split(",")])
            write_jsonl(srows, jsonl)
            best = {}
            for r in srows:
                if "us" in r and r["us"] < best.get((r["proj"], r["rows"]), {"us": float("inf")})["us"]:
                    best[(r["proj"], r["rows"])] = r
            cols = ["proj", "rows", "BLOCK_N", "BLOCK_K", "UNPACK", "STEPS", "num_warps", "num_stages", "us",
                    "limit_us", "of_limit"]
            print(format_table(list(best.values()), cols), flush=True)
            tuned = adopt_best(srows)  # the generate rows below (fastllm) run with the winners
            print(f"GEMV configs adopted for this run: {tuned}", flush=True)
            write_jsonl([{"bench": "generate-tuned", "shape": shape, **tuned}], jsonl)
        if args.kernels:
            krows = kernel_rows(shape)
            write_jsonl(krows, jsonl)
            print(format_table(krows, ["proj", "rows", "provider", "us", "limit_us", "of_limit"]), flush=True)
        if not batches:
            continue
        rows = run(shape, providers, batches=batches, prompt=args.prompt, new_tokens=args.new_tokens, runs=args.runs,
                   jsonl=jsonl, profile=os.path.join(args.out, f"profile_{shape}") if profiled else None,
                   profiled=profiled)
        print(format_table(rows, ["shape", "batch", "provider", "decode_ms_per_token", "limit_ms", "of_limit",
                                  "tokens_per_s", "generate_ms", "peak_gib", "error"]))
        _plot(rows, os.path.join(args.out, f"generate_{shape}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
