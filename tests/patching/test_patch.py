"""The patch registry on a tiny Llama: identity of patched forwards, exact revert, idempotence, PEFT order."""


import re
import types

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

import fastllm
from fastllm import FastLlama, PatchConfig, eager, is_patched, patch, unpatch
from fastllm.arch import SUPPORTED_MODEL_TYPES
from fastllm.modules.checkpointing import nonreentrant_checkpoint, offload_checkpoint
from fastllm.modules.mlp import fast_mlp_forward
from fastllm.modules.rms_norm import fast_rms_norm_forward


def _load(path, **kw):
    kw.setdefault("load_in_4bit", False)
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("patch", False)
    return FastLlama.from_pretrained(path, **kw)[0]


def _snapshot(model):
    return {name: dict(vars(m)) for name, m in model.named_modules()}


def _ids(n=2, t=17, vocab=320):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(7))


def test_patch_binds_fast_forwards_per_instance(tiny_llama_dir):
    model, twin = _load(tiny_llama_dir), _load(tiny_llama_dir)
    report = patch(model, PatchConfig(loss=False))
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    mlps = [m for m in model.modules() if isinstance(m, LlamaMLP)]
    assert all(m.forward.__func__ is fast_rms_norm_forward for m in norms)
    assert all(m.forward.__func__ is fast_mlp_forward for m in mlps)
    assert report.counts["rms_norm"] == len(norms) == 5 and report.counts["mlp"] == len(mlps) == 2
    assert "loss" in report.disabled and "nf4_linear" in report.disabled
    # The twin of the same class is untouched: patches live on instances, not classes.
    assert all("forward" not in vars(m) for m in twin.modules())
    assert is_patched(model) and not is_patched(twin)


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_unpatch_is_bit_identical_and_leaves_nothing(tiny_llama_dir, load_in_4bit):
    dtype = torch.bfloat16 if load_in_4bit else torch.float32
    model = _load(tiny_llama_dir, load_in_4bit=load_in_4bit, dtype=dtype)
    twin = _load(tiny_llama_dir, load_in_4bit=load_in_4bit, dtype=dtype)
    before = _snapshot(model)
    patch(model, PatchConfig(gradient_checkpointing=True, max_seq_length=64))
    assert _snapshot(model) != before
    n = unpatch(model)
    assert n > 0 and not is_patched(model)
    assert _snapshot(model) == before
    x = _ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, twin(x).logits)
    model.train(), twin.train()
    assert torch.equal(model(x, labels=x).loss, twin(x, labels=x).loss)


def test_patched_matches_eager_fp32_and_bf16(tiny_llama_dir):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        model = _load(tiny_llama_dir, dtype=dtype)
        x = _ids()
        with torch.no_grad():
            ref = model(x, labels=x)
            patch(model, PatchConfig(loss=False))
            out = model(x, labels=x)
            with eager(model):
                assert not is_patched(model)
                again = model(x, labels=x)
        assert is_patched(model)
        torch.testing.assert_close(out.logits, ref.logits, atol=tol, rtol=tol)
        torch.testing.assert_close(out.loss, ref.loss, atol=tol, rtol=tol)
        assert torch.equal(again.logits, ref.logits)


def test_patch_twice_equals_once(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    r1 = patch(model, PatchConfig())
    snap = _snapshot(model)
    r2 = patch(model, PatchConfig())
    assert r2 is r1 and _snapshot(model) == snap
    # A different config re-patches from scratch rather than stacking.
    patch(model, PatchConfig(mlp=False))
    assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, LlamaMLP))
    assert unpatch(model) > 0 and unpatch(model) == 0


def test_patch_before_or_after_peft_gives_the_same_model(tiny_llama_dir):
    torch.manual_seed(0)
    # checkpointing named: the "auto" default needs a patched model (unpatched, it means True), and patch(b)'s
    # default config keeps the model's own setting
    a = FastLlama.get_peft_model(_load(tiny_llama_dir, patch=True), r=4, lora_alpha=8, use_gradient_checkpointing=True)
    torch.manual_seed(0)
    b = FastLlama.get_peft_model(_load(tiny_llama_dir, patch=False), r=4, lora_alpha=8, use_gradient_checkpointing=True)
    patch(b)
    assert fastllm.patch_report(a).counts == fastllm.patch_report(b).counts
    ours = (offload_checkpoint, nonreentrant_checkpoint)
    gc = lambda mod: (lambda f: f if f in ours else type(f).__name__)(vars(mod).get("_gradient_checkpointing_func"))
    funcs = lambda m: [(n, getattr(vars(mod).get("forward"), "__func__", None), gc(mod), vars(mod).get(
        "gradient_checkpointing")) for n, mod in m.named_modules()]
    assert funcs(a) == funcs(b)
    x = _ids()
    a.train(), b.train()
    la, lb = a(input_ids=x, labels=x).loss, b(input_ids=x, labels=x).loss
    assert torch.equal(la, lb)
    la.backward(), lb.backward()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        if pa.requires_grad:
            assert torch.equal(pa.grad, pb.grad), na
    # unpatch through the PEFT wrapper restores the eager forwards and HF's own checkpoint function.
    unpatch(a)
    assert all("forward" not in vars(m) for m in a.modules() if isinstance(m, (LlamaMLP, LlamaRMSNorm)))


def test_gradient_checkpointing_modes(tiny_llama_dir):
    model = _load(tiny_llama_dir, patch=True)
    peft_model = FastLlama.get_peft_model(model, r=4, use_gradient_checkpointing="offload")
    layers = model.model.layers
    assert all(layer.gradient_checkpointing and layer._gradient_checkpointing_func is offload_checkpoint
               for layer in layers)
    assert any("no-op for CPU" in n for n in fastllm.patch_report(peft_model).notes)
    x = _ids()
    peft_model.train()
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in peft_model.parameters() if p.requires_grad)
    unpatch(peft_model)
    # After unpatch, transformers' own (non-reentrant) checkpointing is what remains.
    assert all(layer._gradient_checkpointing_func not in (offload_checkpoint, nonreentrant_checkpoint)
               for layer in layers)


def test_offload_on_unpatched_model_is_a_clear_error(tiny_llama_dir):
    with pytest.raises(ValueError, match="needs a fastllm-patched model"):
        FastLlama.get_peft_model(_load(tiny_llama_dir, patch=False), use_gradient_checkpointing="offload")


def test_max_seq_length_guard(tiny_llama_dir):
    model = FastLlama.from_pretrained(tiny_llama_dir, load_in_4bit=False, max_seq_length=16)[0]
    model(_ids(t=16))
    with pytest.raises(ValueError, match="exceeds max_seq_length=16"):
        model(_ids(t=17))
    # A packed row of two 12-token sequences is 24 wide but no sequence is over 16.
    packed_pos = torch.cat([torch.arange(12), torch.arange(12)])[None]
    model(input_ids=_ids(n=1, t=24), position_ids=packed_pos)
    with pytest.raises(ValueError, match="exceeds max_seq_length=16"):
        model(input_ids=_ids(n=1, t=24), position_ids=torch.arange(24)[None])
    unpatch(model)
    model(_ids(t=17))  # the guard is a patch too: gone with unpatch


def test_unknown_option_and_bad_config():
    with pytest.raises(TypeError, match="valid options are: rms_norm, mlp"):
        PatchConfig(fused_rope=True)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        PatchConfig(gradient_checkpointing="sometimes")
    with pytest.raises(TypeError, match="PatchConfig"):
        patch(torch.nn.Linear(2, 2), {"mlp": True})


def test_non_llama_model_is_refused(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(ValueError, match=re.escape(f"supports model_type {SUPPORTED_MODEL_TYPES}") + ".*'gpt2'"):
        patch(gpt2)
    with pytest.raises(ValueError, match="is not a transformers model"):
        patch(torch.nn.Linear(2, 2))


def test_skips_are_counted_with_reasons(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    model.config.hidden_act = "gelu"  # LlamaMLP keeps a reference to this config: both MLPs become ineligible
    report = patch(model, PatchConfig(loss=False))
    assert report.counts["mlp"] == 0
    assert len([s for s in report.skipped if s[0] == "mlp"]) == 2
    assert "activation 'gelu' is not the silu its architecture's entry names" in report.summary()


def test_unpatch_leaves_a_later_foreign_rebinding_alone(tiny_llama_dir, caplog):
    """A library that re-binds a forward after fastllm (TRL wraps model.forward) keeps its change."""
    model = _load(tiny_llama_dir)
    patch(model, PatchConfig())
    ours = model.forward

    def wrapper(self, *args, **kwargs):
        return ours(*args, **kwargs)

    foreign = types.MethodType(wrapper, model)
    model.forward = foreign
    with caplog.at_level("WARNING", logger="fastllm"):
        unpatch(model)
    assert vars(model)["forward"] is foreign
    assert "replaced after patching" in caplog.text
    assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, (LlamaMLP, LlamaRMSNorm)))
