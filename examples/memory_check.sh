#!/usr/bin/env bash
# One GPU pass for activation memory (issue #21), under the GPU image's transformers:
#   device run: bash examples/memory_check.sh    (carry: [".whl"], with .whl/unsloth for the unsloth rows)
# STEPS: tests (the GPU checkpointing tests), train8b / train1b (fastllm's "auto" at the device's budget and at
# Unsloth's peak, beside Unsloth, one run a shape), memory (`fastllm bench memory`). Output under $OUT.
set -uo pipefail
source examples/device_env.sh
if [ -d .whl/unsloth ]; then source examples/unsloth_env.sh || exit 1; fi
steps=${STEPS:-tests,train8b,train1b}
if [[ $steps == *tests* ]]; then
  timeout "${TEST_TIMEOUT:-150}" python -m pytest -q --tb=short tests/test_gpu_model.py -p no:cacheprovider \
    > "$out/gpu-tests.txt" 2>&1
  tail -3 "$out/gpu-tests.txt"
fi
if [[ $steps == *train8b* ]]; then
  timeout "${TRAIN_TIMEOUT:-330}" python -m fastllm.bench.train --shapes 8b --steps 5 --warmup 3 --timeout 200 \
    --providers "${PROVIDERS_8B:-unsloth,fastllm,fastllm:memory_budget=7.0,fastllm:gradient_checkpointing=offload}" \
    --out "$out/train-8b" 2>&1 | tail -8
fi
if [[ $steps == *train1b* ]]; then
  timeout "${TRAIN1B_TIMEOUT:-150}" python -m fastllm.bench.train --shapes 1b --steps 5 --warmup 3 --timeout 120 \
    --providers "${PROVIDERS_1B:-unsloth,fastllm,fastllm:memory_budget=1.75}" --out "$out/train-1b" 2>&1 | tail -6
fi
if [[ $steps == *memory* ]]; then
  timeout "${MEMORY_TIMEOUT:-400}" python -m fastllm.bench.memory ${MEMORY_ARGS:-} --out "$out/memory" 2>&1 | tail -20
fi
