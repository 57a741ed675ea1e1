"""The whole patched QLoRA model on a CUDA GPU: patched vs eager loss and LoRA grads (runs through the device tool)."""

import pytest
import torch

from fastllm import FastLlama, PatchConfig, eager, patch_report

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compile,lora", [(False, None), (None, None), (False, True)])
def test_patched_qlora_on_cuda_matches_eager(tiny_llama_dir, compile, lora):
    model, _ = FastLlama.from_pretrained(tiny_llama_dir, max_seq_length=256,
                                         patch=PatchConfig(compile=compile, lora=lora))
    report = patch_report(model)
    # With compile on, the 4-bit linears take the compiled twin (compile_nf4_linear) instead of nf4_linear.
    assert report.counts.get("nf4_linear", 0) + report.counts.get("compile_nf4_linear", 0) == 14
    assert report.counts["loss"] == 1
    if compile is False:
        assert report.backends.get("rms_norm") == "triton" and report.backends.get("mlp") == "triton"
    model = FastLlama.get_peft_model(model, r=8, lora_alpha=16)
    if lora:  # the fused QLoRA linear serves all 14 LoRA layers
        assert patch_report(model).counts["lora"] == 14
    x = torch.randint(0, 320, (2, 77), device="cuda")
    model.train()

    def grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, g = grads()
    with eager(model):
        ref_loss, ref_g = grads()
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    num = sum((g[n] - ref_g[n]).float().norm() ** 2 for n in g) ** 0.5
    den = sum(ref_g[n].float().norm() ** 2 for n in g) ** 0.5
    assert (num / den).item() < 5e-2
