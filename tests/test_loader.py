"""FastLlama.from_pretrained / get_peft_model on a tiny checkpoint, the real default, and bad input."""

import re

import pytest
import torch

from fastllm import FastLlama, PatchConfig, is_patched
from fastllm._compat import bnb
from fastllm.arch import SUPPORTED_MODEL_TYPES


def test_tiny_4bit_load_is_nf4_double_quant_without_tokenizer(tiny_llama_dir):
    model, tok = FastLlama.from_pretrained(tiny_llama_dir, patch=False)
    assert tok is None
    linears = [m for m in model.modules() if isinstance(m, bnb().nn.Linear4bit)]
    assert len(linears) == 2 * 7
    for m in linears:
        qs = m.weight.quant_state
        assert qs.quant_type == "nf4" and qs.nested and m.compute_dtype == torch.bfloat16
        # The AVX512-BF16 repack trap is switched off on every 4-bit layer.
        assert m.support_avx512bf16_for_cpu is False
    assert not is_patched(model)


def test_get_peft_model_trains_only_lora(tiny_llama_dir):
    model, _ = FastLlama.from_pretrained(tiny_llama_dir)
    peft_model = FastLlama.get_peft_model(model, r=8, lora_alpha=16)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2
    # No fp32 upcast of embeddings / norms (what prepare_model_for_kbit_training would do).
    assert peft_model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    x = torch.randint(0, 320, (2, 33))
    peft_model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        FastLlama.get_peft_model(peft_model)


def test_patch_option_accepts_config(tiny_llama_dir):
    model, _ = FastLlama.from_pretrained(tiny_llama_dir, patch=PatchConfig(mlp=False), max_seq_length=99)
    from fastllm import patch_report
    from fastllm.patching import patch_config

    assert patch_config(model).max_seq_length == 99 and patch_config(model).mlp is False
    assert patch_report(model).counts["mlp"] == 0


def test_bad_inputs_name_the_fix(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"supports model_type {SUPPORTED_MODEL_TYPES}") + ".*gpt2"):
        FastLlama.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        FastLlama.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        FastLlama.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        FastLlama.from_pretrained(str(tmp_path / "model.gguf"))
    with pytest.raises(ValueError, match="unsupported dtype"):
        FastLlama.from_pretrained(tiny_llama_dir, dtype=torch.int8)
    with pytest.raises(ValueError, match="unsupported dtype"):
        FastLlama.from_pretrained(tiny_llama_dir, dtype="float64")
    with pytest.raises(ValueError, match="max_seq_length"):
        FastLlama.from_pretrained(tiny_llama_dir, max_seq_length=0)
    with pytest.raises(TypeError, match="patch must be"):
        FastLlama.from_pretrained(tiny_llama_dir, patch="yes")
    with pytest.raises(TypeError, match="valid options"):
        FastLlama.from_pretrained(tiny_llama_dir, patch=PatchConfig(turbo=True))


def test_default_model_loads_in_4bit_with_chat_tokenizer():
    model, tok = FastLlama.from_pretrained(max_seq_length=128)
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == ("llama", 576, 30, 49152)
    assert cfg.tie_word_embeddings
    assert tok is not None and tok.chat_template is not None and tok.model_max_length == 128
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    from fastllm import patch_report

    report = patch_report(model)
    assert report.counts["rms_norm"] == 61 and report.counts["mlp"] == 30
    enc = tok(["In the beginning God created the heaven and the earth."], return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss
    assert float(loss) < 6.0  # a real model knows Genesis 1:1 far better than chance (ln 49152 = 10.8)
    with pytest.raises(ValueError, match="exceeds max_seq_length=128"):
        model(input_ids=torch.zeros(1, 129, dtype=torch.long))


def test_explicit_gguf_file_loads_like_the_default(default_model_dir):
    import os

    from fastllm.defaults import default_model_gguf

    path = default_model_gguf()
    a, tok_a = FastLlama.from_pretrained(path, load_in_4bit=False, patch=False)
    b, _ = FastLlama.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), load_in_4bit=False,
                                     patch=False)
    assert tok_a is not None and a.config.model_type == "llama"
    x = torch.randint(0, 49152, (1, 9))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
