"""Reproduce the README's QLoRA training-step table (GPU): hf, hf-bf16, liger, fastllm on 1B and 8B shapes.

    python examples/benchmark_e2e.py --out bench-out        # needs a CUDA GPU; liger optional

Each provider runs in a fresh process; results go to bench-out/train.jsonl and train.png.
"""

import sys

from fastllm.bench.train import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("--providers") for a in argv):
        argv += ["--providers", "hf,hf-bf16,liger,fastllm"]
    sys.exit(main(argv))
