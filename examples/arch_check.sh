#!/usr/bin/env bash
# One GPU pass for the architecture table (issue #20), under the GPU image's transformers:
#   device run: SHAPES=qwen3-8b,mistral-7b bash examples/arch_check.sh    (carry: [".whl"], with .whl/unsloth)
# STEPS picks what runs (tests, train, infer); PROVIDERS the training providers. Output under $OUT.
set -uo pipefail
source examples/device_env.sh
if [ -d .whl/unsloth ]; then source examples/unsloth_env.sh || exit 1; fi
if [ -d .whl/latest ] && [ "${LATEST:-0}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/latest \
    .whl/latest/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/latest:/tmp/site
fi
tag=$(python -c "import transformers; print(transformers.__version__.replace('.', ''))")
python -c "import transformers, peft, torch, triton; print(transformers.__version__, peft.__version__, torch.__version__, triton.__version__)" | tee "$out/versions-$tag.txt"
steps=${STEPS:-tests,train,infer}
shapes=${SHAPES:-gemma2-9b,gemma3-4b-vision}
if [[ $steps == *tests* ]]; then
  # test_archs.py runs on the GPU as it is (the loader puts the models on CUDA: Triton kernels, decode graphs)
  timeout "${TEST_TIMEOUT:-240}" python -m pytest -q --tb=short tests/test_archs.py tests/test_gpu_decode_graphs.py \
    -p no:cacheprovider > "$out/arch-tests-$tag.txt" 2>&1
  tail -3 "$out/arch-tests-$tag.txt"
fi
if [[ $steps == *train* ]]; then
  timeout "${TRAIN_TIMEOUT:-420}" python -m fastllm.bench.train --shapes "$shapes" --providers "${PROVIDERS:-fastllm,hf,unsloth}" \
    --steps 5 --warmup 2 --timeout 300 --out "$out/train-$tag" 2>&1 | tail -14
fi
if [[ $steps == *infer* ]]; then
  timeout "${INFER_TIMEOUT:-300}" python -m fastllm.bench.compile --shapes "$shapes" --modes infer \
    --providers "${INFER_PROVIDERS:-eager,fastllm,unsloth}" --quick --out "$out/infer-$tag" 2>&1 | tail -8
fi
