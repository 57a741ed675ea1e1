#!/usr/bin/env bash
# The compile issue's GPU tests and compiled-vs-eager inference check, one device-tool call (~8 min, H200):
#   device run: bash examples/compile_check.sh        (carry: [".whl"])
# Inference runs interleave the providers (bench compile), so host drift hits them alike. Writes under $OUT (or
# ./gpu-out): gpu.txt and compile.tgz (compile.jsonl and the PNGs of each shape). MODES=train for training.
set -uo pipefail
source examples/device_env.sh
# the GPU tests of the compiled paths first (compiled step, curve and generation; decode graphs; the one-token NF4 op)
timeout 150 python -m pytest -q -m gpu tests/test_gpu_compile.py tests/test_gpu_decode_graphs.py tests/ops/test_nf4.py -p no:cacheprovider 2>&1 \
  | tail -4 | tee "$out/compile-tests.txt"
for shape in ${SHAPES:-1b 8b}; do
  providers=eager,fastllm,fastllm+compile
  [ "$shape" = 8b ] && providers=${PROVIDERS_8B:-eager,fastllm+compile}
  timeout 240 python -m fastllm.bench.compile --shapes "$shape" --modes "${MODES:-infer}" --quick \
    --providers "$providers" --out "$out/compile/$shape" 2>&1 | tail -6
done
tar czf "$out/compile.tgz" -C "$out" compile && rm -rf "$out/compile"
