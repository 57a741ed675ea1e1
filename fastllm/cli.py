"""fastllm: train, eval, max-batch, merge and bench (fastllm <command> --help)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

BENCHES = {"dequant": "fastllm.bench.dequant", "loss": "fastllm.bench.loss", "train": "fastllm.bench.train",
           "compile": "fastllm.bench.compile"}
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


def _common(p, *, lora: bool = True) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint dir or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--results", default=None, help="also append the final JSON line to this file")
    if lora:
        p.add_argument("--lora-r", type=int, default=16)
        p.add_argument("--gradient-checkpointing", choices=["on", "off", "offload"], default="on")


def _data_args(p) -> None:
    p.add_argument("--data", default=None, help=".txt/.json/.jsonl file (default: embedded King James Bible); "
                                                "records with chat roles use the tokenizer's chat template")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks for perplexity")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("train", help="QLoRA fine-tune (default: embedded SmolLM2-135M on the King James Bible)")
    _common(p)
    _data_args(p)
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--optim", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--save-every", type=int, default=0, help="also save adapter + state every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the state saved in --output")
    p.add_argument("--no-patch", action="store_true", help="train the plain eager transformers model")
    p.add_argument("--prompt", default=None, help="prompt for the sample printed after training")
    p.add_argument("--output", default="./fastllm-out")

    p = sub.add_parser("eval", help="held-out perplexity of a model (and adapter)")
    _common(p, lora=False)
    _data_args(p)
    p.add_argument("--adapter", default=None, help="a PEFT adapter directory (e.g. fastllm train's --output)")

    p = sub.add_parser("max-batch", help="largest per-device batch whose training step fits in memory")
    _common(p)
    p.add_argument("--cap", type=int, default=256, help="upper bound of the search")

    p = sub.add_parser("merge", help="merge a LoRA adapter into a 16-bit checkpoint for plain transformers")
    _common(p, lora=False)
    p.add_argument("--adapter", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")

    p = sub.add_parser("bench", help="GPU benchmarks against the eager baseline and peers")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (try --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("fastllm").setLevel(logging.INFO)
    if args.command == "bench":
        return int(importlib.import_module(BENCHES[args.name]).main(args.args) or 0)
    from . import commands

    run = {"train": commands.cmd_train, "eval": commands.cmd_eval, "max-batch": commands.cmd_max_batch,
           "merge": commands.cmd_merge}[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
