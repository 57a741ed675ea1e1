"""GPU: decode numerics against eager, teacher-forced (``fastllm.bench.numerics``): with and without decode graphs,
fastllm's generation logits stay within 1.3x of transformers' own static-vs-dynamic-cache noise floor."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_decode_logits_within_the_noise_floor():
    from fastllm import FastLlama
    from fastllm.bench.models import build_qlora_base
    from fastllm.bench.numerics import init_lora_b, teacher_forced

    # The floor's static-cache generate compiles transformers' forward: start dynamo fresh, as a user's process does
    # (the compile tests before this one leave their own caches and counters).
    torch._dynamo.reset()
    model = build_qlora_base("1b", "cuda")
    torch.manual_seed(0)
    model = FastLlama.get_peft_model(model, r=16, lora_alpha=16)
    init_lora_b(model)
    rows = teacher_forced(model, ["eager+static", "fastllm", "fastllm:decode_graphs=false"], prompt=64, steps=48)
    floor = rows["eager+static"]
    for name in ("fastllm", "fastllm:decode_graphs=false"):
        row = rows[name]
        assert row["rel_err"] <= max(1.3 * floor["rel_err"], 1e-3), (name, row, floor)
        assert row["argmax_agree"] >= floor["argmax_agree"] - 0.05, (name, row, floor)
