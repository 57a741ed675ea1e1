"""Reproduce the README's QLoRA training-step table (GPU): hf, liger, unsloth, fastllm on 1B and 8B shapes.

    source examples/unsloth_env.sh                          # optional: Unsloth from carried wheels
    python examples/benchmark_e2e.py --shapes 1b,8b --out bench-out   # needs a CUDA GPU; liger optional

A provider that is not installed is listed as skipped, with the reason.
Each provider runs in a fresh process; results go to bench-out/train.jsonl and train.png.
"""

import sys

from fastllm.bench.train import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("--providers") for a in argv):
        argv += ["--providers", "hf,liger,unsloth,fastllm"]
    sys.exit(main(argv))
