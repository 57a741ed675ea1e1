"""``fastllm bench grpo``: TRL GRPOTrainer steps (no vLLM) on a QLoRA policy, HF+PEFT+bitsandbytes against fastllm.

One GRPO step samples ``generations`` completions for each of ``prompts`` prompts through the policy's ``generate``
(left-padded batch, temperature 1), scores them, and trains on the group-normalised rewards: generation is most of
it. Each provider runs in its own process on the same random QLoRA model (``bench.compile.build_qlora``: NF4
double quant, LoRA r16 on all linears) with TRL's GRPO defaults (bf16, gradient checkpointing, beta 0):

- ``hf``: transformers + PEFT + bitsandbytes as they come (fastllm unpatched);
- ``fastllm``: fastllm's defaults (decode graphs, fused QLoRA training path, auto checkpointing);
- ``fastllm:dense``: the same with ``ops.dense_decode`` (the rollouts read dense copies of the 4-bit weights, made
  at each generate call and dropped after it);
- ``unsloth``: Unsloth's model on the same NF4 bytes (``bench.unsloth_provider``) and its patched GRPOTrainer
  (imported after Unsloth, which patches TRL at import; no vLLM), with Unsloth's own pinned TRL.

The tokenizer is built here over the shape's vocabulary (word ``w<id>`` is token ``id``), so a prompt of P random
words is P tokens and any sampled id decodes; completions are exactly ``new_tokens`` long (``min_new_tokens``:
random weights would otherwise stop at a random EOS and the providers would do different work). Per row: seconds
per step and in ``generate`` (medians of the measured steps after ``warmup``), sequence tokens per second, peak GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from .common import format_table, pick, stamp, write_jsonl
from .models import SHAPES

PROVIDERS = ("hf", "fastllm", "fastllm:dense", "unsloth")


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer over ``vocab_size`` ids: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, ``w<i>`` i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   model_max_length=1 << 20, padding_side="left")


def _reward(completions, **kwargs) -> list[float]:
    """Share of even token ids in each completion: cheap, and spread within every group."""
    out = []
    for text in completions:
        ids = [int(w[1:]) for w in text.split() if w.startswith("w")]
        out.append(sum(i % 2 == 0 for i in ids) / max(1, len(ids)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(provider: str, shape: str, device: torch.device, *, prompts: int, generations: int, prompt: int,
            new_tokens: int, steps: int, warmup: int, seed: int = 0) -> dict:
    """``warmup + steps`` GRPO steps of ``provider``; timings of the last ``steps``."""
    note = None
    if provider == "unsloth":  # first: Unsloth patches transformers, PEFT and TRL as it is imported
        from .unsloth_provider import build

        model, note = build(shape, device, prompt + new_tokens + 64)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from .. import PatchConfig, is_patched, patch, unpatch
    from .compile import build_qlora

    if provider != "unsloth":
        model = build_qlora(shape, device)
        unpatch(model)
    if provider.startswith("fastllm"):  # get_peft_model's default checkpointing
        patch(model, PatchConfig(gradient_checkpointing="auto"))
    if provider == "fastllm:dense":
        from ..ops import dense_decode

        dense_decode.set_enabled(True)
    tok = word_tokenizer(model.config.get_text_config().vocab_size)
    gen = torch.Generator().manual_seed(seed)
    rows = [{"prompt": " ".join(f"w{i}" for i in torch.randint(3, tok.vocab_size, (prompt,), generator=gen).tolist())}
            for _ in range(prompts * (warmup + steps))]
    step_s, gen_s, lens = [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            step_s.append(time.perf_counter() - self.t0)

    generate = model.generate

    def timed_generate(*args, **kwargs):  # the bench's clock around the policy's own generate
        _sync(device)
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        _sync(device)
        gen_s.append(time.perf_counter() - t0)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            lens.append(out.shape[1] - ids.shape[1])
        return out

    model.generate = timed_generate
    cuda = device.type == "cuda"
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="fastllm-grpo-"), max_steps=warmup + steps,
                     per_device_train_batch_size=prompts * generations, num_generations=generations,
                     max_completion_length=new_tokens, generation_kwargs={"min_new_tokens": new_tokens},
                     temperature=1.0, logging_steps=1, report_to=[], save_strategy="no", seed=seed,
                     bf16=cuda, use_cpu=not cuda, learning_rate=1e-5)
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step = statistics.median(step_s[warmup:])
    # a trainer that generates some other way (Unsloth's) leaves no generate times: the step time still stands
    in_gen = statistics.median(gen_s[warmup:]) if len(gen_s) > warmup else None
    seqs = prompts * generations
    return {"provider": provider, "patched": is_patched(model), "step_s": step, "generate_s": in_gen,
            "train_s": None if in_gen is None else step - in_gen, "setup": note,
            "tokens_per_s": seqs * (prompt + new_tokens) / step,
            "completion_tokens_per_s": seqs * new_tokens / step, "new_tokens_seen": sorted(set(lens)),
            "loss": losses[-1] if losses else None,
            "peak_gib": torch.cuda.max_memory_allocated(device) / (1 << 30) if cuda else None}


def run(shape: str, providers, args, jsonl: str | None) -> list:
    from .train import spawn_command, unavailable

    base = {"bench": "grpo", "shape": shape, "prompts": args.prompts, "generations": args.generations,
            "prompt": args.prompt, "new_tokens": args.new_tokens, "steps": args.steps, **stamp()}
    rows = []
    for provider in providers:
        cmd = ["--worker", provider, "--shapes", shape, "--prompts", str(args.prompts), "--generations",
               str(args.generations), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--steps",
               str(args.steps), "--warmup", str(args.warmup)]
        why = unavailable(provider)
        found = {"error": why} if why else spawn_command("fastllm.bench.grpo", cmd, provider, timeout=args.timeout)
        row = {**base, **found}
        row.setdefault("provider", provider)
        ref = next((r for r in rows if r["provider"] == "hf" and "step_s" in r), None)
        if ref and "step_s" in row:
            row["speedup_vs_hf"] = ref["step_s"] / row["step_s"]
        print({k: row.get(k) for k in ("provider", "step_s", "generate_s", "speedup_vs_hf", "error")}, flush=True)
        if jsonl:
            write_jsonl([row], jsonl)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastllm bench grpo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-out", help="directory for grpo.jsonl")
    p.add_argument("--shapes", default="1b", help=f"comma-separated, from: {', '.join(sorted(SHAPES))}")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, from: {', '.join(PROVIDERS)}")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=4, help="completions per prompt (TRL's num_generations)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per provider")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    providers = pick(p, args.providers, PROVIDERS, "provider")
    shapes = pick(p, args.shapes, sorted(SHAPES), "shape")
    small = [n for n in ("prompts", "prompt", "new_tokens", "steps") if getattr(args, n) < 1]
    if small or args.generations < 2 or args.warmup < 0:
        p.error("--prompts, --prompt, --new-tokens and --steps take positive integers, --generations at least 2 "
                "(GRPO normalises rewards within a group), --warmup 0 or more")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if args.worker:
        row = measure(args.worker, shapes[0], torch.device("cuda"), prompts=args.prompts,
                      generations=args.generations, prompt=args.prompt, new_tokens=args.new_tokens, steps=args.steps,
                      warmup=args.warmup)
        print("ROW " + json.dumps(row), flush=True)
        return 0
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "grpo.jsonl")
    for shape in shapes:
        rows = run(shape, providers, args, jsonl)
        print(format_table(rows, ["shape", "provider", "step_s", "generate_s", "train_s", "tokens_per_s",
                                  "speedup_vs_hf", "peak_gib", "error"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
