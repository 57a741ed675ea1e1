#!/usr/bin/env bash
# One GPU pass for decode (issue #23), under the GPU image's transformers:
#   device run: bash examples/decode_check.sh    (carry: [".whl"], with .whl/unsloth for the unsloth rows)
# STEPS: tests (the GEMV kernels and ops, the adapter cast and LoRA-term kernels, decode-op, decode-graph and
# auto-checkpointing GPU tests), sweep (the GEMV's tile
# alternatives; the fastest are adopted for this run's fastllm rows), profile (with generate: one decode step's device
# time by kernel group, per provider (PROFILED: all local ones, or a list) and batch), kernels (one 8B layer's GEMVs against bitsandbytes' and dequant + GEMM), generate (`fastllm bench
# generate` at BATCHES), grpo (`fastllm bench grpo`: TRL GRPO steps, hf, fastllm and unsloth, GRPO_SHAPE, default 1b).
# Output under $OUT.
set -uo pipefail
source examples/device_env.sh
if [ -d .whl/unsloth ]; then source examples/unsloth_env.sh || exit 1; fi
steps=${STEPS:-tests,generate}
if [[ $steps == *tests* ]]; then
  timeout "${TEST_TIMEOUT:-240}" python -m pytest -q --tb=short -p no:cacheprovider tests/test_gpu_gemv.py \
    tests/kernels/test_cast_cat.py tests/kernels/test_lora_add.py tests/kernels/test_nf4_gemv.py tests/kernels/test_lora_xa.py tests/kernels/test_pdl.py \
    tests/ops/test_decode_attention.py tests/ops/test_lora_decode.py \
    tests/test_gpu_decode_graphs.py "tests/test_gpu_model.py::test_decode_step_with_lora_takes_the_decode_op" \
    "tests/test_gpu_model.py::test_auto_checkpointing_on_cuda_matches_recompute" > "$out/gpu-tests.txt" 2>&1
  tail -15 "$out/gpu-tests.txt"
fi
extra=""
if [[ $steps == *sweep* ]]; then extra="$extra --sweep --sweep-rows ${SWEEP_ROWS:-1,8,32}"; fi
if [[ $steps == *kernels* ]]; then extra="$extra --kernels"; fi
if [[ $steps == *profile* ]]; then extra="$extra --profile ${PROFILED:-all}"; fi
batches=${BATCHES:-1,8,32}
if [[ $steps != *generate* ]]; then batches=""; fi
if [[ -n "$extra$batches" ]]; then
  timeout "${GENERATE_TIMEOUT:-300}" python -m fastllm.bench.generate --shapes "${SHAPES:-8b}" $extra \
    --providers "${PROVIDERS:-fastllm,fastllm:sync,fastllm:lut,fastllm:finish,fastllm:xa=fused+pdl,fastllm:xa=fused+pdl+lut+finish,unsloth}" --batches "$batches" \
    --new-tokens "${NEW_TOKENS:-256}" --runs "${RUNS:-3}" --out "$out/generate" 2>&1 | tail -60
fi
if [[ $steps == *grpo* ]]; then
  timeout "${GRPO_TIMEOUT:-560}" python -m fastllm.bench.grpo --shapes "${GRPO_SHAPE:-1b}" \
    --providers "${GRPO_PROVIDERS:-hf,fastllm,fastllm:dense,unsloth}" --new-tokens "${GRPO_NEW_TOKENS:-256}" --steps "${GRPO_STEPS:-2}" --timeout 180 --out "$out/grpo" 2>&1 | tail -20
fi
