"""Real weights in the other layouts of the table: the embedded SmolLM2-135M re-laid as Mistral and Qwen2
(``conftest.relay_checkpoint``). The same function under other classes: identical logits, and ``fastllm train
--model <fixture>`` lands within 1% of ``--no-patch`` in held-out perplexity."""

import json
import os

import pytest
import torch

from fastllm.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_relaid_checkpoint_computes_the_same_function(default_model_dir, relaid_default, model_type):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    other = AutoModelForCausalLM.from_pretrained(relaid_default(model_type), dtype=torch.float32)
    assert other.config.model_type == model_type and type(other).__name__.lower().startswith(model_type)
    x = torch.randint(0, ref.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(other(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_train_on_a_relaid_checkpoint_matches_no_patch(relaid_default, model_type, tmp_path):
    path = relaid_default(model_type)
    runs = {}
    for name, extra in (("patched", []), ("eager", ["--no-patch"])):
        out = tmp_path / name
        assert main(["train", "--model", path, "--max-seq-length", "64", "--eval-blocks", "2", "--lora-r", "4",
                     "--max-steps", "3", "--lr", "1e-3", "--output", str(out), *extra]) == 0
        with open(os.path.join(out, "run_summary.json")) as f:
            runs[name] = json.load(f)
    patched, eager = runs["patched"], runs["eager"]
    assert patched["perplexity_after"] < patched["perplexity_before"]
    assert abs(patched["perplexity_after"] / eager["perplexity_after"] - 1) < 0.01
    with open(os.path.join(tmp_path / "patched", "adapter_config.json")) as f:
        targets = sorted(json.load(f)["target_modules"])
    assert targets == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
