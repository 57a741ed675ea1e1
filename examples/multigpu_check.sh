#!/usr/bin/env bash
# The FSDP2 QLoRA path on a 2-GPU host (what a session runs through the device tool on nvidia-h200-x2):
#   device run (kind nvidia-h200-x2, carry [".whl"]): bash examples/multigpu_check.sh
# 8B-shaped Llama-3 (random weights built once), global batch 8 x 2048, patches on and off:
#   1 GPU (two references run side by side, one per GPU) vs torchrun --nproc_per_node 2;
# then the rank-0 adapter loaded in plain PEFT against the 1-GPU adapter, then the multigpu tests.
# Everything lands under $OUT (or ./gpu-out): logs, metrics.jsonl per run, adapter checks.
set -uo pipefail
source examples/device_env.sh
model=${MODEL:-8b}
steps=${STEPS:-6}
cache=/tmp/fastllm-cache
common=(--model "$model" --steps "$steps" --batch-size 8 --seq-len 2048 --cache-dir "$cache")
ex=examples/train_fsdp2.py
t0=$SECONDS
# Build the random checkpoint once, before two processes could race to build it.
python -c "import sys, torch; sys.path.insert(0, 'examples'); import train_fsdp2 as t; \
print(t.build_random_model('$model', '$cache', 2048, 0, torch.device('cuda', 0)))" 2>&1 | tail -2
echo "built in $((SECONDS - t0)) s"
CUDA_VISIBLE_DEVICES=0 python $ex "${common[@]}" --out "$out/1gpu-patched" > "$out/1gpu-patched.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 python $ex "${common[@]}" --no-patch --out "$out/1gpu-nopatch" > "$out/1gpu-nopatch.log" 2>&1 &
wait
tail -n 4 "$out"/1gpu-*.log
echo "1-GPU references done at $((SECONDS - t0)) s"
for mode in patched nopatch; do
  flag=(); [ $mode = nopatch ] && flag=(--no-patch)
  torchrun --standalone --nproc_per_node 2 $ex "${common[@]}" "${flag[@]}" --out "$out/2gpu-$mode" \
    > "$out/2gpu-$mode.log" 2>&1
  tail -n 4 "$out/2gpu-$mode.log"
  echo "2-GPU $mode done at $((SECONDS - t0)) s"
done
python examples/check_adapter.py --base "$cache/random-llama-$model" --adapter "$out/2gpu-patched/adapter" \
  --reference "$out/1gpu-patched/adapter" --json "$out/adapter-check.json" 2>&1 | tail -3
echo "adapter check done at $((SECONDS - t0)) s"
rm -rf "$cache"
timeout ${TEST_TIMEOUT:-300} python -m pytest -q -m multigpu tests -p no:cacheprovider 2>&1 | tail -15 \
  | tee "$out/multigpu-tests.txt"
echo "all done at $((SECONDS - t0)) s"
