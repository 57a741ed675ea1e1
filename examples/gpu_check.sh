#!/usr/bin/env bash
# One GPU validation pass (what a session runs through the device tool; ~8 minutes on an H100/H200):
#   ../shared/tools/gpu-wheels            # once, here: fetches bitsandbytes/trl/liger/cce wheels into .whl
#   device run: bash examples/gpu_check.sh   (carry: [".whl"])
# Writes everything under $OUT (or ./gpu-out): GPU test log, bench JSON lines, tables, PNGs, profiles.
set -uo pipefail
source examples/device_env.sh
python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -15 | tee "$out/gpu-tests.txt"
python -m fastllm.bench.train --shapes 1b,8b --providers hf,hf-bf16,liger,fastllm,fastllm:lora=1,fastllm:compile=1 \
  --profile --timeout 300 --out "$out" 2>&1 | tail -16
