"""``fastllm`` command line: ``fastllm train`` (the main job) and ``fastllm bench ...``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time

BENCHES = {"compile": "fastllm.bench.compile", "dequant": "fastllm.bench.dequant", "loss": "fastllm.bench.loss",
           "train": "fastllm.bench.train"}
SAMPLE_PROMPT = "And God said unto Moses,"


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="QLoRA fine-tune (defaults: embedded SmolLM2-135M on the King James Bible)")
    p.add_argument("--model", default=None, help="HF checkpoint dir or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--data", default=None, help=".txt/.json/.jsonl file (default: embedded King James Bible)")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks for perplexity")
    p.add_argument("--gradient-checkpointing", choices=["on", "off", "offload"], default="on")
    p.add_argument("--no-patch", action="store_true", help="train the plain eager transformers model")
    p.add_argument("--output", default="./fastllm-out")
    p.add_argument("--seed", type=int, default=0)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="GPU benchmarks against the eager baseline and peers")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (try --help)")


def cmd_train(args) -> int:
    import torch

    from . import FastLlama, PatchConfig
    from .data import load_texts, pack, split_texts
    from .loader import DEFAULT
    from .training import perplexity, sample, train

    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tok = FastLlama.from_pretrained(args.model or DEFAULT, max_seq_length=args.max_seq_length,
                                           patch=False if args.no_patch else PatchConfig())
    if tok is None:
        raise SystemExit("fastllm train needs a tokenizer in the checkpoint")
    gc = {"on": True, "off": False, "offload": "offload"}[args.gradient_checkpointing]
    model = FastLlama.get_peft_model(model, r=args.lora_r, lora_alpha=args.lora_r, use_gradient_checkpointing=gc)
    train_texts, held_texts = split_texts(load_texts(args.data, tok), seed=args.seed)
    need = args.max_steps * args.batch_size * args.grad_accum
    blocks = pack(tok, train_texts, args.max_seq_length, max_blocks=max(need, 64))
    held = pack(tok, held_texts, args.max_seq_length, max_blocks=args.eval_blocks)
    print(f"loaded in {time.time() - t0:.1f}s; {len(blocks)} training blocks x {args.max_seq_length} tokens, "
          f"{len(held)} held-out blocks")
    ppl_before = perplexity(model, held)
    print(f"held-out perplexity before: {ppl_before:.2f}")
    result = train(model, blocks, max_steps=args.max_steps, batch_size=args.batch_size,
                   grad_accum=args.grad_accum, lr=args.lr, seed=args.seed)
    ppl_after = perplexity(model, held)
    print(f"held-out perplexity after:  {ppl_after:.2f}  ({result.tokens_per_s:.0f} tokens/s training)")
    text = sample(model, tok, SAMPLE_PROMPT)
    print(f"sample: {SAMPLE_PROMPT}{text}")
    os.makedirs(args.output, exist_ok=True)
    model.save_pretrained(args.output)
    summary = {"model": args.model or DEFAULT, "data": args.data or "kjv", "steps": result.steps,
               "losses": result.losses, "tokens_per_s": result.tokens_per_s, "seconds": result.seconds,
               "perplexity_before": ppl_before, "perplexity_after": ppl_after, "sample": text}
    with open(os.path.join(args.output, "run_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"saved the LoRA adapter to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("fastllm").setLevel(logging.INFO)
    if args.command == "train":
        return cmd_train(args)
    module = importlib.import_module(BENCHES[args.name])
    return int(module.main(args.args) or 0)


if __name__ == "__main__":
    sys.exit(main())
