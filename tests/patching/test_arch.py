"""The architecture table: data only, the source of the supported types and classes; look-alike modules (a
subclass that overrides the forward fastllm's replacement was written against) fail closed with a reason."""

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
    with pytest.raises(ValueError, match=r"supports model_type \('llama',\), got 'gpt2'"):
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
