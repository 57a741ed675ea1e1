"""fastllm: train, eval, max-batch, merge and bench (fastllm <command> --help)."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys

BENCHES = {"dequant": "fastllm.bench.dequant", "loss": "fastllm.bench.loss", "train": "fastllm.bench.train",
           "compile": "fastllm.bench.compile", "memory": "fastllm.bench.memory",
           "generate": "fastllm.bench.generate", "grpo": "fastllm.bench.grpo",
           "sass": "fastllm.bench.sass"}
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


class _Parser(argparse.ArgumentParser):
    """An argument error is one line naming the fix (``--help`` has the usage), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(lo: int, why: str = ""):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}{why}, got {v}")
        return v
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return v


def _path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty; pass a path")
    return text


def _common(p, *, lora: bool = True) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint dir or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--max-seq-length", type=_int_at_least(2, " (a block needs a token and its successor)"),
                   default=256)
    p.add_argument("--results", type=_path, default=None, help="also append the final JSON line to this file")
    if lora:
        p.add_argument("--lora-r", type=_int_at_least(1), default=16)
        p.add_argument("--gradient-checkpointing", choices=["auto", "on", "off", "offload"], default="auto",
                       help="auto: per layer keep / recompute / offload, the fastest mix under --memory-budget")
        p.add_argument("--memory-budget", type=_positive_float, default=None,
                       help="GiB for --gradient-checkpointing auto (default: what the device can give)")


def _data_args(p) -> None:
    p.add_argument("--data", default=None, help=".txt/.json/.jsonl file (default: embedded King James Bible); "
                                                "records with chat roles use the tokenizer's chat template")
    p.add_argument("--eval-blocks", type=_int_at_least(1), default=16, help="held-out blocks for perplexity")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("train", help="QLoRA fine-tune (default: embedded SmolLM2-135M on the King James Bible)")
    _common(p)
    _data_args(p)
    p.add_argument("--max-steps", type=_int_at_least(1), default=50)
    p.add_argument("--batch-size", type=_int_at_least(1), default=2)
    p.add_argument("--grad-accum", type=_int_at_least(1), default=1)
    p.add_argument("--lr", type=_positive_float, default=2e-4)
    p.add_argument("--optim", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="compute dtype (auto: bf16, fp16 where the device has no bf16)")
    p.add_argument("--save-every", type=_int_at_least(0), default=0,
                   help="also save a checkpoint every N steps (SIGINT/SIGTERM and the end always save one)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output")
    p.add_argument("--no-patch", action="store_true", help="train the plain eager transformers model")
    p.add_argument("--prompt", default=None, help="prompt for the sample printed after training")
    p.add_argument("--output", type=_path, default="./fastllm-out")

    p = sub.add_parser("eval", help="held-out perplexity of a model (and adapter)")
    _common(p, lora=False)
    _data_args(p)
    p.add_argument("--adapter", type=_path, default=None,
                   help="a PEFT adapter directory (e.g. fastllm train's --output)")

    p = sub.add_parser("max-batch", help="largest per-device batch whose training step fits in memory")
    _common(p)
    p.add_argument("--cap", type=_int_at_least(1), default=256, help="upper bound of the search")

    p = sub.add_parser("merge", help="merge a LoRA adapter into a 16-bit checkpoint for plain transformers")
    _common(p, lora=False)
    p.add_argument("--adapter", type=_path, required=True)
    p.add_argument("--output", type=_path, required=True)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")

    p = sub.add_parser("bench", help="GPU benchmarks against the eager baseline and peers")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (try --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or an argument error already printed as one line
        return done.code if isinstance(done.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("fastllm").setLevel(logging.INFO)
    if args.command == "bench":
        return int(importlib.import_module(BENCHES[args.name]).main(args.args) or 0)
    from . import commands

    run = {"train": commands.cmd_train, "eval": commands.cmd_eval, "max-batch": commands.cmd_max_batch,
           "merge": commands.cmd_merge}[args.command]
    try:
        return run(args)
    except (ValueError, TypeError, OSError) as err:
        # Bad input (data, paths, checkpoints, arguments fastllm's API refused): one line, exit 2.
        # -v keeps the traceback, for when the message is not enough.
        if args.verbose:
            raise
        ours = isinstance(err, commands.InputError) or type(err).__module__.startswith("fastllm")
        msg = " ".join(str(err).split())  # one line, whatever the exception held
        print(f"fastllm {args.command}: error: {msg}" + ("" if ours else " (-v shows where)"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
