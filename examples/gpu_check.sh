#!/usr/bin/env bash
# One GPU validation pass (what a session runs through the device tool; GPU tests ~2 min, then ~2 min (1B) or
# ~5 min (8B) for the four providers on an H200):
#   ../shared/tools/gpu-wheels --unsloth   # once, here: fetches bitsandbytes/trl/liger/cce (+ Unsloth) into .whl
#   device run: bash examples/gpu_check.sh              (carry: [".whl"]; GPU tests + the 1B bench)
#   device run: TESTS=0 SHAPES=8b bash examples/gpu_check.sh   (the 8B bench in a second call)
# Writes under $OUT (or ./gpu-out): gpu.txt, gpu-tests.txt and bench.tgz (train.jsonl, table, PNG, profiles;
# one archive because the device tool returns few files).
set -uo pipefail
source examples/device_env.sh
source examples/unsloth_env.sh || echo "no Unsloth wheels: the unsloth row is skipped"
if [ "${TESTS:-1}" = 1 ]; then
  python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -15 | tee "$out/gpu-tests.txt"
fi
python -m fastllm.bench.train --shapes "${SHAPES:-1b}" \
  --providers "${PROVIDERS:-hf,liger,unsloth,fastllm}" \
  --profile --timeout 300 --out "$out/bench" 2>&1 | tail -16
tar czf "$out/bench.tgz" -C "$out" bench && rm -rf "$out/bench"
