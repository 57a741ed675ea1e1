#!/usr/bin/env bash
# The compiled-vs-eager inference check of the compile issue, one device-tool call (~6 min on an H200):
#   device run: bash examples/compile_check.sh        (carry: [".whl"])
# Inference runs interleave the providers (bench compile), so host drift hits them alike. Writes under $OUT (or
# ./gpu-out): gpu.txt and compile.tgz (compile.jsonl and the PNGs of each shape). MODES=train for training.
set -uo pipefail
source examples/device_env.sh
for shape in ${SHAPES:-1b 8b}; do
  providers=eager,fastllm,fastllm+compile
  [ "$shape" = 8b ] && providers=${PROVIDERS_8B:-eager,fastllm+compile}
  timeout 280 python -m fastllm.bench.compile --shapes "$shape" --modes "${MODES:-infer}" --quick \
    --providers "$providers" --out "$out/compile/$shape" 2>&1 | tail -6
done
tar czf "$out/compile.tgz" -C "$out" compile && rm -rf "$out/compile"
