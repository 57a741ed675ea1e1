"""Decode numerics on the CPU: fastllm's generation logits are eager's bits (the GPU row is ``bench compile
--modes numerics``), and the bench's teacher forcing really keeps every provider on eager's tokens."""

import pytest
import torch

from fastllm import FastLlama
from fastllm.bench.compile import numerics_rows
from fastllm.bench.models import build_qlora_base
from fastllm.bench.numerics import init_lora_b, provider_config, teacher_forced


@pytest.fixture(scope="module")
def qlora():
    model = build_qlora_base("tiny128", "cpu", dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = FastLlama.get_peft_model(model, r=8, lora_alpha=16)
    init_lora_b(model)
    return model


@pytest.mark.parametrize("autocast", [torch.bfloat16, None])
def test_fastllm_generation_logits_are_eagers(qlora, autocast):
    providers = ["eager+static", "fastllm", "fastllm:lora=true", "fastllm:lora=true,fused_layer=false"]
    rows = teacher_forced(qlora, providers, prompt=11, steps=9, autocast=autocast)
    assert rows["eager+static"]["rel_err"] > 0  # the floor: transformers' two caches differ in bf16
    for p in providers[1:]:
        assert rows[p]["rel_err"] == 0.0 and rows[p]["argmax_agree"] == 1.0, (p, rows[p])


def test_numerics_rows_and_provider_names(qlora):
    rows = numerics_rows(qlora, ("eager", "fastllm", "fastllm-nographs", "fastllm+compile"), prompt=7, steps=4,
                         base={}, shape="tiny128", jsonl=None)
    assert [r["provider"] for r in rows] == ["eager+static", "fastllm", "fastllm:decode_graphs=false"]
    assert all(r["mode"] == "numerics" and 0 <= r["argmax_agree"] <= 1 for r in rows)
    assert provider_config("fastllm:lora=true,decode_graphs=none").lora is True
    with pytest.raises(ValueError, match="unknown numerics provider"):
        provider_config("liger")
