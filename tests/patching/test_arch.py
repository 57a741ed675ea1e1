"""The architecture table: data only, the source of the supported types and classes; look-alike modules (a
subclass that overrides the forward fastllm's replacement was written against) fail closed with a reason."""

import re

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

import fastllm
from fastllm import FastModel, PatchConfig, patch, unpatch
from fastllm.arch import ARCHS, ROLES, SUPPORTED_MODEL_TYPES, arch_of
from fastllm.modules.mlp import fast_mlp_forward


def test_table_entries_name_real_transformers_classes():
    assert SUPPORTED_MODEL_TYPES == tuple(ARCHS) and fastllm.FastLlama.from_pretrained is FastModel.from_pretrained
    for arch in ARCHS.values():
        assert set(arch.classes) == set(ROLES)
        for role in ROLES:
            assert isinstance(arch.cls(role), type)
    with pytest.raises(ValueError, match=re.escape(f"supports model_type {SUPPORTED_MODEL_TYPES}, got 'gpt2'")):
        arch_of("gpt2")


class _OwnMLP(LlamaMLP):
    def forward(self, x):  # same maths, another function: not what fastllm's replacement was checked against
        return super().forward(x)


class _PlainMLP(LlamaMLP):
    pass


def test_a_look_alike_fails_closed_and_a_plain_subclass_is_patched(tiny_llama_dir):
    model = FastModel.from_pretrained(tiny_llama_dir, load_in_4bit=False, dtype=torch.float32, patch=False)[0]
    layers = model.model.layers
    layers[0].mlp.__class__ = _OwnMLP
    layers[1].mlp.__class__ = _PlainMLP
    report = patch(model, PatchConfig(loss=False))
    assert "forward" not in vars(layers[0].mlp)
    assert vars(layers[1].mlp)["forward"].__func__ is fast_mlp_forward
    assert report.counts["mlp"] == 1
    assert any(s[0] == "mlp" and "_OwnMLP overrides LlamaMLP.forward" in s[2] for s in report.skipped)
    assert report.counts["rms_norm"] == sum(isinstance(m, LlamaRMSNorm) for m in model.modules())
    unpatch(model)


def _lora_model(tiny_arch_dir, model_type):
    from fastllm.modules.layer import LAYER_CALLS

    model = FastModel.from_pretrained(tiny_arch_dir(model_type), dtype=torch.float32, max_seq_length=256,
                                      patch=False)[0]
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    LAYER_CALLS.clear()
    return model, LAYER_CALLS


def test_an_attention_whose_submodules_differ_from_its_entry_fails_closed(tiny_arch_dir):
    """A Llama attention carrying a q/k norm its entry does not list (the upstream forward would ignore it, fastllm's
    would apply it), and a Qwen3 attention missing its k_norm: neither gets the attention patch, and the fused layer
    leaves such a layer to op-by-op checkpointing."""
    for model_type, edit, reason in (
            ("llama", lambda a: (a.add_module("q_norm", torch.nn.Identity()),
                                 a.add_module("k_norm", torch.nn.Identity())),
             "q_norm, k_norm on a llama attention, whose table entry has no q/k norm"),
            ("qwen3", lambda a: delattr(a, "k_norm"), "qwen3 attention without its q_norm/k_norm modules")):
        model, calls = _lora_model(tiny_arch_dir, model_type)
        attn = model.base_model.model.model.layers[0].self_attn
        edit(attn)
        report = patch(model, PatchConfig(lora=True, nf4_linear=True))
        assert report.counts["lora_attention"] == 1
        assert ("lora_attention", "model.layers.0.self_attn", reason) in [
            (s[0], s[1].split("base_model.model.")[-1], s[2]) for s in report.skipped]
        if model_type == "llama":  # the Qwen3 one could not run at all: its own forward reads k_norm
            model.train()
            ids = torch.randint(0, 331, (2, 19))
            model(input_ids=ids, labels=ids).loss.backward()
            assert calls == {"fused": 1, "an attention without fastllm's attention patch": 1}
        unpatch(model)
