"""The whole patched QLoRA model on a CUDA GPU: patched vs eager loss and LoRA grads (runs through the device tool)."""

import pytest
import torch

from fastllm import FastLlama, PatchConfig, eager, patch_report

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compile,lora,fused_layer", [(False, None, None), (None, None, None), (False, True, False)])
def test_patched_qlora_on_cuda_matches_eager(tiny_llama_dir, compile, lora, fused_layer):
    model, _ = FastLlama.from_pretrained(tiny_llama_dir, max_seq_length=256,
                                         patch=PatchConfig(compile=compile, lora=lora, fused_layer=fused_layer))
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


def test_offloaded_checkpointing_on_cuda_matches_plain(tiny_llama_dir):
    """``use_gradient_checkpointing="offload"`` (layer inputs parked in pinned CPU memory, async copies) gives
    the same loss and LoRA grads as plain non-reentrant checkpointing: only where the inputs wait changes."""
    from fastllm.modules.checkpointing import offload_checkpoint
    from fastllm.modules.layer import fused_layer_offload

    x = torch.randint(0, 320, (2, 77), device="cuda")
    results = []
    for mode in (True, "offload"):
        model, _ = FastLlama.from_pretrained(tiny_llama_dir, max_seq_length=256)
        torch.manual_seed(0)  # the same LoRA init for both
        model = FastLlama.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=mode)
        layers = model.base_model.model.model.layers
        assert all((layer._gradient_checkpointing_func in (offload_checkpoint, fused_layer_offload))
                   == (mode == "offload") for layer in layers)
        model.train()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, g), (loss_off, g_off) = results
    torch.testing.assert_close(loss_off, loss, rtol=1e-6, atol=1e-6)  # the forward is the same maths
    # backward may differ in the last bits only (attention backward accumulates with atomics)
    num = sum((g_off[n] - g[n]).float().norm() ** 2 for n in g) ** 0.5
    den = sum(g[n].float().norm() ** 2 for n in g) ** 0.5
    assert (num / den).item() < 1e-3


def test_auto_checkpointing_on_cuda_matches_recompute(tiny_llama_dir):
    """``"auto"`` on the GPU: the calibration passes (layer 0 counted with its saved tensors parked on the host, the
    rest offloaded; then the overhead again on a warm step), the device's own budget (room to spare: every layer
    kept) and budgets that force a mixed plan and the all-offload plan (side-stream copies, prefetch) give full
    recompute's loss and grads."""
    x = torch.randint(0, 320, (2, 77), device="cuda")

    def build(mode):
        model, _ = FastLlama.from_pretrained(tiny_llama_dir, max_seq_length=256)
        torch.manual_seed(0)
        model = FastLlama.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=mode)
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        model.train()
        return model

    def step(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def close(a, b):
        torch.testing.assert_close(a[0], b[0], rtol=1e-3, atol=1e-3)
        num = sum((a[1][n] - b[1][n]).float().norm() ** 2 for n in b[1]) ** 0.5
        den = sum(b[1][n].float().norm() ** 2 for n in b[1]) ** 0.5
        assert (num / den).item() < 2e-2

    ref = step(build(True))
    model = build("auto")
    auto = patch_report(model).live["gradient_checkpointing"]
    close(step(model), ref)
    assert auto.plan == ("measure", "offload") and auto.calibrations[0].overhead > 0
    assert not auto.calibrations[0].warm
    close(step(model), ref)  # the overhead measured again on a warm step
    assert auto.plan == ("offload", "offload") and auto.calibrations[0].warm
    close(step(model), ref)
    assert auto.plan == ("keep", "keep")  # an H200's budget holds a tiny model's activations
    assert auto.calibrations[0].checked and auto._check is not None  # this step's peak is read when the next begins
    now = torch.cuda.memory_allocated()
    overhead, keep = auto.calibrations[0].overhead, auto.calibrations[0].keep_per_token * x.numel()
    for budget, plan in ((now + overhead + 1.5 * keep, ("recompute", "keep")), (now, ("offload", "offload"))):
        auto.budget = budget
        close(step(model), ref)
        # below the leanest plan: the MLPs in lean tiles, and that first tiled pass is checked
        assert auto.plan == plan and (auto._check is not None) == (budget == now)
        assert ("tiles" in auto.summary()) == (budget == now)

    # The first planned step after a calibration is checked: an allocation after its backward (an optimizer's, say)
    # that takes the step over the budget is overhead the calibration missed, and the next plans count it.
    model = build("auto")
    auto = patch_report(model).live["gradient_checkpointing"]
    step(model)
    step(model)
    cal = auto.calibrations[0]
    keep = cal.keep_per_token * x.numel()
    auto.budget = budget = torch.cuda.memory_allocated() + cal.overhead + 1.5 * keep
    close(step(model), ref)
    assert auto.plan == ("recompute", "keep") and auto._check is not None
    before = cal.overhead
    spike = torch.empty(int(budget - torch.cuda.memory_allocated() + keep), dtype=torch.uint8, device="cuda")
    del spike
    close(step(model), ref)
    assert cal.overhead >= before + keep and "keep" not in auto.plan and auto._check is None


def test_decode_step_with_lora_takes_the_decode_op(tiny_llama_dir, monkeypatch):
    """With the lora patch on (auto on CUDA), a one-token no-grad call under autocast (generation's decode step) runs
    each group of projections through ``lora_decode`` (fastllm's NF4 GEMV, gate/up with the activation as one
    ``lora_decode_glu``), not the fused
    dequant + GEMM ops; the logits follow eager PEFT + bnb (within the norm and RoPE kernels' rounding), also a few
    steps into a KV cache. With grad mode on, a one-token call still trains the adapters (PEFT's path)."""
    from fastllm.modules import lora as lora_mod
    from fastllm.ops import lora as lora_ops
    from fastllm.ops import lora_mlp as mlp_ops
    from fastllm.ops import lora_qkv as qkv_ops

    model, _ = FastLlama.from_pretrained(tiny_llama_dir, max_seq_length=256)
    model = FastLlama.get_peft_model(model, r=8, lora_alpha=16)
    assert patch_report(model).counts["lora"] == 14
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so the adapters show in the output
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    calls, decodes = [], []
    for fn in (lora_ops.LoRANF4Function, mlp_ops.LoRAMLPFunction, qkv_ops.LoRAQKVFunction):
        monkeypatch.setattr(fn, "apply", lambda *a, _apply=fn.apply: calls.append(1) or _apply(*a))
    real_decode, real_glu = lora_mod.lora_decode, lora_mod.lora_decode_glu
    monkeypatch.setattr(lora_mod, "lora_decode", lambda *a: decodes.append(1) or real_decode(*a))
    monkeypatch.setattr(lora_mod, "lora_decode_glu", lambda *a, **k: decodes.append(1) or real_glu(*a, **k))
    x = torch.randint(0, 320, (1, 1), device="cuda")
    prompt = torch.randint(0, 320, (1, 9), device="cuda")
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        # Without autocast PEFT runs the fp32 adapters in fp32: fastllm leaves such inference calls to PEFT's
        # forward (eager's numerics), so no decode op runs.
        plain = model(input_ids=x).logits
        assert calls == [] and decodes == []
        with eager(model):
            torch.testing.assert_close(plain, model(input_ids=x).logits, rtol=2e-2, atol=2e-2)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # the adapters run in bf16, as in PEFT
        out = model(input_ids=x).logits
        # q/k/v, gate/up and o_proj of each layer; down_proj too where the GEMV takes its in_features (the
        # tiny model's 160 is not a multiple of the blocksize 64: PEFT's forward serves that one)
        per_layer = 3 + (model.config.intermediate_size % 64 == 0)
        assert calls == [] and len(decodes) == per_layer * n_layers
        steps = model.generate(input_ids=prompt, **gen).logits
        with eager(model):
            ref = model(input_ids=x).logits
            ref_steps = model.generate(input_ids=prompt, **gen).logits
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(steps, ref_steps):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    # grad mode on: a one-token call records the adapters' graph (PEFT's forward), so they get gradients
    model.train()
    model(input_ids=x).logits.float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
