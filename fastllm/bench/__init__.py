"""Benchmarks (`fastllm bench ...`): GPU timings as ratios against eager and peers in one run."""
