# Sourced after examples/device_env.sh for the `unsloth` provider of `fastllm bench train`: installs the carried
# Unsloth wheels (.whl/unsloth: unsloth, unsloth_zoo, trl 1.15 and the few deps the GPU image lacks) into their
# own site. Only the unsloth worker puts it on PYTHONPATH, first (train.spawn_worker): Unsloth pins trl<=1.15, and the
# other providers keep trl 1.16 from /tmp/site. diffusers and hf_transfer are left out: only downloads use them.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/unsloth_site \
  .whl/unsloth/*.whl || return 1
export UNSLOTH_SITE=/tmp/unsloth_site
# Offline machine: no statistics ping (a download from the Hub) and no Hub look-ups; compiled modules go to /tmp
# rather than ./unsloth_compiled_cache in the repo.
export UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache
