"""API misuse caught at the call: option types (bool is not an int), a second get_peft_model on a wrapped model."""

import pytest
import torch

from fastllm import FastLlama, PatchConfig


@pytest.mark.parametrize("kwargs", [dict(max_seq_length=True), dict(loss=0), dict(lora=1),
                                    dict(gradient_checkpointing=0), dict(max_seq_length=1.5)])
def test_patch_config_refuses_wrong_types(kwargs):
    with pytest.raises((TypeError, ValueError), match="PatchConfig"):
        PatchConfig(**kwargs)


def test_from_pretrained_refuses_a_bool_length(tiny_llama_dir):
    with pytest.raises(ValueError, match="max_seq_length must be a positive int"):
        FastLlama.from_pretrained(tiny_llama_dir, max_seq_length=True)


def test_second_get_peft_model_on_the_same_base_is_refused(tiny_llama_dir):
    base, _ = FastLlama.from_pretrained(tiny_llama_dir, load_in_4bit=False, dtype=torch.float32)
    first = FastLlama.get_peft_model(base, r=4, lora_alpha=4)
    with torch.no_grad():
        for n, p in first.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)  # "trained"
    before = {n: p.clone() for n, p in first.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="already wrapped by an earlier get_peft_model"):
        FastLlama.get_peft_model(base, r=4, lora_alpha=4)
    for n, p in first.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n


def test_bench_train_fails_when_every_provider_fails(tmp_path, monkeypatch):
    from fastllm.bench import train as bench_train

    monkeypatch.setattr(bench_train, "unavailable", lambda provider: "not here")
    assert bench_train.main(["--providers", "hf", "--shapes", "1b", "--out", str(tmp_path)]) != 0
