"""QLoRA with FSDP2: the same global batch on N ranks or on one, with losses, speed and memory logged.

    torchrun --nproc_per_node 2 examples/train_fsdp2.py --model 8b --steps 20 --batch-size 8 --seq-len 2048
    python examples/train_fsdp2.py --model 8b --steps 20 --batch-size 8 --seq-len 2048   # 1-GPU reference

``--model tiny|1b|8b`` builds a random-weight Llama of that shape once (Llama-3.2-1B / Llama-3-8B
shapes; ``tiny`` runs on a CPU) and saves it under ``--cache-dir``; a path loads a checkpoint. ``--layerwise``
(implied by ``--model 70b``) instead builds any shape of ``fastllm.bench.models.SHAPES`` on every rank, on the meta
device, one decoder layer at a time, each layer's linears quantized to NF4 before the next exists: no rank ever holds
the whole bf16 model (Llama-3-70B: 140 GB in bf16, ~37 GB in NF4 before ``shard()`` keeps 1/N of it), and every
rank builds the same bytes (a generator seeded per layer). Every
rank loads it through ``FastLlama.from_pretrained(..., load_in_4bit=True, device_map=None)`` onto its
own device (``cuda:LOCAL_RANK``, or the CPU with gloo), adds LoRA and, with more than one rank, shards
it with ``fastllm.integrations.fsdp2.shard``. With one process nothing is sharded: that run is the
single-device reference for the same global batch (``torchrun --nproc_per_node 1 ... --shard`` shards on
one rank: the reference for ``--mixed-precision``, whose casts are FSDP2's). ``--compile`` turns on
``PatchConfig(compile=True)``; each rank's compile statistics (graphs per region, graph breaks) go into
the summary.

Each step's global batch (``--batch-size`` sequences of ``--seq-len`` tokens, drawn from a fixed seed
and the step number) is split evenly over ranks, then into ``--grad-accum`` micro-batches. All
sequences are full length, so the mean over micro-batches and ranks is the global mean loss and the
N-rank run follows the 1-rank run. Rank 0 writes ``metrics.jsonl`` under ``--out`` (one line per step,
then a summary: tokens/s per rank and in total, peak memory per rank) and the PEFT adapter to
``--out/adapter``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

SHAPES = {  # name -> LlamaConfig kwargs (random weights)
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | 1b | 8b (random weights) or a checkpoint path; 70b or any "
                   "fastllm.bench.models shape with --layerwise")
    p.add_argument("--layerwise", action="store_true",
                   help="build --model (a fastllm.bench.models shape) layer by layer on every rank, quantizing")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences per step, all ranks)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--dtype", default=None, help="compute dtype (default bf16 on GPUs, fp32 on the CPU)")
    p.add_argument("--no-patch", action="store_true", help="plain transformers + PEFT (fastllm patches off)")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="GiB: gradient checkpointing 'auto' (keep / recompute / offload per layer) under this budget")
    p.add_argument("--compile", action="store_true", help="PatchConfig(compile=True): inductor regions per layer")
    p.add_argument("--lora", action="store_true", help="PatchConfig(lora=True): the fused QLoRA linear")
    p.add_argument("--mixed-precision", default="none", choices=("none", "bf16"),
                   help="FSDP2 MixedPrecisionPolicy: bf16 params, fp32 reduce")
    p.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPU offload (CUDA only)")
    p.add_argument("--shard", action="store_true",
                   help="shard even with one rank (torchrun --nproc_per_node 1): the reference for --mixed-precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.environ.get("FASTLLM_CACHE", os.path.expanduser("~/.cache/fastllm")))
    p.add_argument("--out", default="fsdp2-out")
    return p.parse_args(argv)


def setup_distributed(force: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world, device). Initialises the process group when there is more than one rank (or ``force``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # NVLink multicast (NVLS) stays off: it is unsupported on the lent GPU hosts.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(local_rank)  # before any CUDA work, so each rank owns one GPU
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 or force:
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Long timeout: rank 0 may be building and saving a random 8B checkpoint while others wait.
        kwargs = dict(backend=backend, timeout=datetime.timedelta(minutes=30))
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return rank, world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def build_random_model(name: str, cache_dir: str, seq_len: int, rank: int, device: torch.device) -> str:
    """Save a random Llama of shape ``name`` once (rank 0, on the GPU when there is one); return its path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.path.join(cache_dir, f"random-llama-{name}")
    if rank == 0 and not os.path.isfile(os.path.join(path, "config.json")):
        cfg = LlamaConfig(max_position_embeddings=max(2048, seq_len), rms_norm_eps=1e-5, **SHAPES[name])
        torch.manual_seed(1234)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: no transient fp32 copy of an 8B model
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        tmp = f"{path}.tmp-{os.getpid()}"
        model.save_pretrained(tmp)
        del model
        os.replace(tmp, path)  # readers never see half a checkpoint
        if device.type == "cuda":
            torch.cuda.empty_cache()
    barrier()
    return path


def global_batch(step: int, args, vocab: int) -> torch.Tensor:
    """(batch, seq_len) token ids for ``step``: a random segment repeated, so the loss can fall."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + step)
    seg = max(1, args.seq_len // 4)
    base = torch.randint(0, vocab, (args.batch_size, seg), generator=g)
    return base.repeat(1, -(-args.seq_len // seg))[:, : args.seq_len]


def current_memory_mib(device: torch.device) -> float:
    """Memory in use now: allocated CUDA memory, or this process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux: KiB)


def local_param_mib(model) -> float:
    """Parameter bytes this rank holds (4-bit weights with their absmax; LoRA and the rest)."""
    from torch.distributed.tensor import DTensor

    from fastllm.integrations.fsdp2 import NF4Param

    total = 0
    for p in model.parameters():
        t = p._local_tensor if isinstance(p, DTensor) else p
        if isinstance(t, NF4Param):
            total += t.packed.numel() * t.packed.element_size() + t.absmax.numel() * t.absmax.element_size()
            continue
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
    return total / 2**20


def compile_stats(model) -> dict | None:
    """This rank's compiled regions: graphs per region and dynamo's graph breaks (None when not compiled)."""
    from fastllm import compile_report

    rep = compile_report(model)
    if rep is None:
        return None
    return dict(graphs_per_region=rep.graphs_per_region, recompiles=rep.recompiles, graph_breaks=rep.graph_breaks,
                break_reasons=rep.break_reasons, eager_calls=rep.eager_calls, compile_s=rep.compile_seconds)


def _patch_config(args):
    from fastllm import PatchConfig

    opts = {}
    if args.compile:
        opts["compile"] = True
    if args.lora:  # the fused QLoRA linear (opt-in), over fastllm's NF4 linear
        opts.update(lora=True, nf4_linear=True)
    return False if args.no_patch else PatchConfig(**opts) if opts else True


def _with_lora(model, args):
    from fastllm import FastModel

    torch.manual_seed(args.seed)  # identical LoRA init on every rank and in the 1-rank reference
    if args.memory_budget is not None:
        return FastModel.get_peft_model(model, r=args.lora_r, lora_alpha=args.lora_r, use_gradient_checkpointing="auto",
                                        memory_budget=args.memory_budget)
    return FastModel.get_peft_model(model, r=args.lora_r, lora_alpha=args.lora_r,
                                    use_gradient_checkpointing=not args.no_checkpointing)


def load_model(path: str, args, device: torch.device):
    from fastllm import FastModel

    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model, _ = FastModel.from_pretrained(path, load_in_4bit=True, dtype=dtype, device_map=None,
                                         max_seq_length=args.seq_len, patch=_patch_config(args))
    return _with_lora(model, args)


def build_layerwise(args, device: torch.device):
    """``--layerwise``: the shape built on this rank one decoder layer at a time (``build_qlora_base``), patched as
    ``from_pretrained`` would patch it, then LoRA."""
    from fastllm import PatchConfig, patch
    from fastllm.bench.models import build_qlora_base

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_qlora_base(args.model, device, dtype=dtype, seed=1234, layerwise=True)
    cfg = _patch_config(args)
    if cfg is not False:
        patch(model, (cfg if isinstance(cfg, PatchConfig) else PatchConfig()).replace(max_seq_length=args.seq_len))
    return _with_lora(model, args)


def train(args) -> list[dict]:
    rank, world, device = setup_distributed(force=args.shard)
    if args.batch_size % (world * args.grad_accum):
        raise SystemExit(f"--batch-size {args.batch_size} must divide by world size x grad accum "
                         f"({world} x {args.grad_accum})")
    # On the CPU the peak is the process's peak RSS, libraries included: subtract what was resident before
    # the model was loaded to see what training itself costs per rank.
    import bitsandbytes  # noqa: F401  (the libraries count as baseline, not as training memory)
    import peft  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    base_mem = current_memory_mib(device)
    if args.layerwise or args.model == "70b":
        model = build_layerwise(args, device)
    else:
        path = args.model if args.model not in SHAPES else build_random_model(args.model, args.cache_dir,
                                                                              args.seq_len, rank, device)
        model = load_model(path, args, device)
    sharded = world > 1 or args.shard
    if sharded:
        from fastllm.integrations.fsdp2 import shard

        shard(model, mixed_precision=None if args.mixed_precision == "none" else args.mixed_precision,
              cpu_offload=args.cpu_offload)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    vocab = model.get_base_model().config.get_text_config().vocab_size
    local = args.batch_size // world
    micro = local // args.grad_accum
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records = []
    seen_dtype = {}  # the LoRA weight's dtype as forward sees it (FSDP2's param_dtype); no hook in compiled code
    probe = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    hook = None if args.compile else probe.register_forward_pre_hook(
        lambda m, a: seen_dtype.update(lora=str(m.weight.dtype)))  # returns None: the inputs stay as they are
    model.train()
    for step in range(args.steps):
        ids = global_batch(step, args, vocab)[rank * local:(rank + 1) * local].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for k in range(args.grad_accum):
            if sharded:  # reduce-scatter once per step, on the last micro-batch
                model.set_requires_gradient_sync(k == args.grad_accum - 1)
            mb = ids[k * micro:(k + 1) * micro]
            loss = model(input_ids=mb, labels=mb).loss / args.grad_accum
            loss.backward()
            total += loss.detach()
        frozen_with_grad = sum(1 for p in model.parameters() if not p.requires_grad and p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if sharded:
            dist.all_reduce(total)
            total /= world
        rec = dict(step=step, loss=total.item(), step_s=dt, tokens_per_s_rank=local * args.seq_len / dt,
                   frozen_params_with_grad=frozen_with_grad)
        records.append(rec)
        if rank == 0:
            print(f"step {step:4d}  loss {rec['loss']:.6f}  {dt * 1000:8.1f} ms  "
                  f"{rec['tokens_per_s_rank'] * world:10.0f} tok/s total", flush=True)
    if hook is not None:
        hook.remove()
    summary = summarize(args, model, opt, records, rank, world, device, base_mem)
    summary["lora_compute_dtype"] = seen_dtype.get("lora")  # bf16 under --mixed-precision bf16
    from fastllm import patch_report

    report = patch_report(model)
    auto = report.live.get("gradient_checkpointing") if report is not None else None
    summary["checkpoint_plan"] = list(auto.plan) if auto is not None else None  # the last pass's, under "auto"
    save(args, model, records, summary, rank, sharded)
    barrier()
    return records


def summarize(args, model, opt, records, rank, world, device, base_mem) -> dict:
    timed = records[1:] or records  # step 0 includes one-off warm-up (allocations, autotuning)
    step_s = sum(r["step_s"] for r in timed) / len(timed)
    peak = peak_memory_mib(device)
    mine = dict(rank=rank, peak_mem_mib=peak, train_mem_mib=peak - base_mem, param_mib=local_param_mib(model),
                tokens_per_s=args.batch_size // world * args.seq_len / step_s, compile=compile_stats(model),
                lora_master_dtypes=sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}))
    per_rank = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(per_rank, mine)
    else:
        per_rank = [mine]
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    return dict(summary=True, world_size=world, model=args.model, patched=not args.no_patch, lora=args.lora,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                global_batch=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
                mixed_precision=args.mixed_precision, cpu_offload=args.cpu_offload,
                mean_step_s=step_s, tokens_per_s_total=args.batch_size * args.seq_len / step_s,
                per_rank=per_rank, trainable_tensors=n_trainable,
                optimizer_state_tensors=len(opt.state), losses=[r["loss"] for r in records],
                versions=dict(torch=torch.__version__, python=sys.version.split()[0]))


def save(args, model, records, summary, rank, sharded) -> None:
    adapter = os.path.join(args.out, "adapter")
    if sharded:
        from fastllm.integrations.fsdp2 import save_adapter

        save_adapter(model, adapter)
    elif rank == 0:
        model.save_pretrained(adapter)  # plain PEFT: the reference format
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        summary["adapter"] = adapter
        with open(os.path.join(args.out, "metrics.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.write(json.dumps(summary) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}), flush=True)


if __name__ == "__main__":
    train(parse_args())
    # Destroyed only once train()'s model is gone: its DTensors' device mesh holds the process group, and a Gloo
    # group whose threads outlive destroy_process_group until interpreter finalization can abort a good run.
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
