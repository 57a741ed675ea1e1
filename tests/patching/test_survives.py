"""Patches survive what transformers and PEFT do to a model in normal use, or the model is reported unpatched.

For each: train()/eval() under transformers' hub kernels, a re-kernelization, gradient_checkpointing_enable /
disable, dtype moves, save_pretrained, PEFT merge_and_unload and disable_adapter, torch.compile(model).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

import fastllm
from fastllm import FastLlama, PatchConfig, is_patched, patch, unpatch
from fastllm.modules.mlp import fast_mlp_forward
from fastllm.modules.rms_norm import fast_rms_norm_forward


def _ids(n=2, t=13, vocab=320):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(3))


def _hf(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)


def _intact(model) -> bool:
    mods = list(model.modules())
    return (all(getattr(vars(m).get("forward"), "__func__", None) is fast_rms_norm_forward
                for m in mods if isinstance(m, LlamaRMSNorm))
            and all(getattr(vars(m).get("forward"), "__func__", None) is fast_mlp_forward
                    for m in mods if isinstance(m, LlamaMLP)))


def _snapshot(model):
    return {name: dict(vars(m)) for name, m in model.named_modules()}


def _needs_hub_kernels(model):
    if not callable(getattr(model, "reset_kernels", None)) or not model.use_kernels:
        pytest.skip("this transformers does not load models with hub kernels")


def test_train_and_eval_keep_patches_under_hub_kernels(tiny_llama_dir):
    model, twin = _hf(tiny_llama_dir), _hf(tiny_llama_dir)
    _needs_hub_kernels(model)
    mode = model.kernels_mode
    before = _snapshot(model)
    report = patch(model, PatchConfig(loss=False))
    assert any("hub kernels" in n for n in report.notes) and not model.use_kernels
    for switch in (model.train, model.eval, model.train):
        switch()
        assert _intact(model) and is_patched(model)
    x = _ids()
    model.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, twin(x).logits, rtol=1e-5, atol=1e-5)
    unpatch(model)
    # Kernelization comes back in the mode the model had, so the unpatched model is the one transformers loaded.
    assert model.use_kernels and model.kernels_mode == mode
    assert _snapshot(model) == before


def test_loader_leaves_hub_kernels_off_on_a_patched_model(tiny_llama_dir):
    model, _ = FastLlama.from_pretrained(tiny_llama_dir, load_in_4bit=False, dtype=torch.float32)
    assert not getattr(model, "use_kernels", False)
    model.train()
    assert _intact(model)


def test_kernelizing_again_unpatches_with_a_warning(tiny_llama_dir, caplog):
    model, twin = _hf(tiny_llama_dir), _hf(tiny_llama_dir)
    _needs_hub_kernels(model)
    patch(model, PatchConfig(loss=False))
    model.set_use_kernels(True)  # the user turns transformers' kernels back on: they re-bind the norms' forwards
    x = _ids()
    with caplog.at_level("WARNING", logger="fastllm"):
        with torch.no_grad():
            out = model(x).logits
    assert "replaced after patching" in caplog.text and "hub kernels" in caplog.text
    assert not is_patched(model)
    assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, LlamaMLP))
    with torch.no_grad():
        torch.testing.assert_close(out, twin(x).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model(x).logits, twin(x).logits)


def test_a_user_rebinding_is_reported_not_half_patched(tiny_llama_dir, caplog):
    model = _hf(tiny_llama_dir)
    patch(model, PatchConfig(loss=False))
    mlp = model.model.layers[0].mlp
    mlp.forward = LlamaMLP.forward.__get__(mlp)
    with caplog.at_level("WARNING", logger="fastllm"):
        assert not is_patched(model)
    assert "LlamaMLP.forward" in caplog.text and "another library or user code" in caplog.text
    assert "forward" not in vars(model.model.norm)  # the rest was reverted: eager, not half-patched
    assert vars(mlp)["forward"].__func__ is LlamaMLP.forward  # the user's binding is theirs to keep


def test_gradient_checkpointing_enable_and_disable_after_patching(tiny_llama_dir):
    model, _ = FastLlama.from_pretrained(tiny_llama_dir, load_in_4bit=False, dtype=torch.float32)
    peft_model = FastLlama.get_peft_model(model, r=4, lora_alpha=8)
    layers = model.model.layers

    def ours(layer):  # get_peft_model's default: "auto", one function a layer
        return getattr(layer._gradient_checkpointing_func, "fastllm_auto", None) is not None

    assert all(ours(layer) for layer in layers)
    # HF Trainer calls this at the start of training: fastllm's checkpoint function comes back.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert is_patched(peft_model)
    assert all(ours(layer) for layer in layers)
    x = _ids()
    peft_model.train()
    peft_model(input_ids=x, labels=x).loss.backward()
    model.gradient_checkpointing_disable()
    assert is_patched(peft_model) and _intact(model)
    assert not any(layer.gradient_checkpointing for layer in layers)
    unpatch(peft_model)
    assert not any(layer.gradient_checkpointing for layer in layers)  # the user's choice outlives unpatch
    assert not any(ours(layer) for layer in layers)


def test_dtype_moves_keep_patches(tiny_llama_dir):
    model, twin = _hf(tiny_llama_dir), _hf(tiny_llama_dir)
    patch(model, PatchConfig(loss=False))
    model.to(torch.bfloat16), twin.to(torch.bfloat16)
    assert _intact(model) and is_patched(model)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits.float(), twin(x).logits.float(), rtol=3e-2, atol=3e-2)


def test_save_pretrained_keeps_patches_and_saves_the_eager_weights(tiny_llama_dir, tmp_path):
    model, twin = _hf(tiny_llama_dir), _hf(tiny_llama_dir)
    patch(model)
    model.save_pretrained(tmp_path / "full")
    assert _intact(model) and is_patched(model)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    assert all("forward" not in vars(m) for m in again.modules())
    x = _ids()
    with torch.no_grad():
        assert torch.equal(again(x).logits, twin(x).logits)


def _peft(path, load_in_4bit=False):
    cfg = PatchConfig(lora=True) if load_in_4bit else True  # the fused QLoRA ops run on 4-bit linears only
    model, _ = FastLlama.from_pretrained(path, load_in_4bit=load_in_4bit, dtype=torch.float32, patch=cfg)
    torch.manual_seed(0)
    peft_model = FastLlama.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return peft_model


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_disable_adapter_gives_the_base_model(tiny_llama_i128_dir, load_in_4bit):
    peft_model = _peft(tiny_llama_i128_dir, load_in_4bit)
    twin = FastLlama.from_pretrained(tiny_llama_i128_dir, load_in_4bit=load_in_4bit, dtype=torch.float32,
                                     patch=False)[0]
    x = _ids()
    with torch.no_grad():
        with_adapter = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=x).logits
        assert is_patched(peft_model)
        torch.testing.assert_close(base, twin(x).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(with_adapter, base, atol=1e-3)


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_merge_and_unload_gives_the_merged_model(tiny_llama_i128_dir, load_in_4bit):
    peft_model = _peft(tiny_llama_i128_dir, load_in_4bit)
    x = _ids()
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
        merged = peft_model.merge_and_unload()
        assert is_patched(merged) and _intact(merged)
        out = merged(x).logits
        with fastllm.eager(merged):
            ref = merged(x).logits
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if not load_in_4bit:  # merging into 4-bit weights re-quantizes them: only 16-bit keeps the outputs
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        unpatch(merged)
        assert torch.equal(merged(x).logits, ref)


def test_torch_compile_of_the_patched_model(tiny_llama_dir):
    model, twin = _hf(tiny_llama_dir), _hf(tiny_llama_dir)
    patch(model, PatchConfig(loss=False))
    compiled = torch.compile(model, backend="eager")
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, twin(x).logits, rtol=1e-5, atol=1e-5)
    assert is_patched(model) and _intact(model)
    assert fastllm.unpatch(model) > 0
