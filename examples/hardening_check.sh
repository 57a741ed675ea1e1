#!/usr/bin/env bash
# One GPU pass for the hardening work, under the GPU image's transformers (default) or today's (LATEST=1):
#   device run: bash examples/hardening_check.sh            (carry: [".whl"])
#   device run: LATEST=1 bash examples/hardening_check.sh   (the same under transformers 5.25 / peft 0.21.2)
# STEPS picks what runs (tests, numerics, train); NUMERICS_SHAPE / TRAIN_SHAPE the shapes. Output under $OUT.
set -uo pipefail
source examples/device_env.sh
tag=517
if [ "${LATEST:-0}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/latest \
    .whl/latest/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/latest:/tmp/site
  tag=525
fi
python -c "import transformers, peft, torch, triton; print(transformers.__version__, peft.__version__, torch.__version__, triton.__version__)" | tee "$out/versions-$tag.txt"
steps=${STEPS:-tests,numerics}
if [[ $steps == *tests* ]]; then
  timeout "${TEST_TIMEOUT:-260}" python -m pytest -q -m gpu tests -p no:cacheprovider ${TEST_ARGS:-} 2>&1 | tail -25 > "$out/gpu-tests-$tag.txt"
  tail -3 "$out/gpu-tests-$tag.txt"
fi
if [[ $steps == *numerics* ]]; then
  timeout "${NUM_TIMEOUT:-200}" python -m fastllm.bench.compile --shapes "${NUMERICS_SHAPE:-8b}" --modes numerics \
    --providers fastllm,fastllm-nographs --quick --out "$out/num-$tag" 2>&1 | tail -8
  cp "$out/num-$tag/compile.jsonl" "$out/numerics-$tag.jsonl" 2>/dev/null; rm -rf "$out/num-$tag"
fi
if [[ $steps == *train* ]]; then
  timeout "${TRAIN_TIMEOUT:-240}" python -m fastllm.bench.train --shapes "${TRAIN_SHAPE:-8b}" --providers "${PROVIDERS:-hf,fastllm}" \
    --steps 5 --warmup 2 --timeout 200 --out "$out/train-$tag" 2>&1 | tail -8
  cp "$out/train-$tag/train.jsonl" "$out/train-$tag.jsonl" 2>/dev/null; rm -rf "$out/train-$tag"
fi
