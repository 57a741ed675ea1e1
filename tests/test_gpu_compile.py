"""Compiled vs eager QLoRA on a CUDA GPU, as the benchmark runs it (bf16 weights, bf16 autocast,
gradient checkpointing): loss and LoRA gradients of one step, then a short training curve.

The CPU suite compares compiled and eager regions in fp32 on tiny shapes; this checks the GPU path
(Triton NF4 dequant inside the compiled custom op, SDPA inside the attention region) at a real width.
"""

import pytest
import torch

from fastllm import FastLlama, PatchConfig, compile_report, eager

pytestmark = pytest.mark.gpu

WIDE_VOCAB = 128256  # conftest.wide_llama_dir


def _model(path, compile):
    model, _ = FastLlama.from_pretrained(path, dtype=torch.bfloat16, max_seq_length=1024,
                                         patch=PatchConfig(compile=compile))
    torch.manual_seed(0)
    return FastLlama.get_peft_model(model, r=16, lora_alpha=16)


def _step(model, x):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(g, ref):
    num = sum((g[n] - ref[n]).norm() ** 2 for n in ref) ** 0.5
    return (num / sum(ref[n].norm() ** 2 for n in ref) ** 0.5).item()


@pytest.mark.parametrize("shape", ["tiny", "wide"])
def test_compiled_step_matches_eager_on_cuda(tiny_llama_i128_dir, wide_llama_dir, shape):
    path = tiny_llama_i128_dir if shape == "tiny" else wide_llama_dir
    vocab = 320 if shape == "tiny" else WIDE_VOCAB
    model = _model(path, compile=True)
    model.train()
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B so every LoRA gradient is non-trivial
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randint(0, vocab, (2, 251), device="cuda")  # odd length, within the tiny max positions
    loss, g = _step(model, x)
    with eager(model):
        ref_loss, ref_g = _step(model, x)
    rep = compile_report(model)
    assert rep.graph_breaks == 0, rep.break_reasons
    err = _rel(g, ref_g)
    print(f"{shape}: loss {loss.item():.6f} vs eager {ref_loss.item():.6f}; LoRA grad rel err {err:.4f}")
    torch.testing.assert_close(loss, ref_loss, rtol=5e-3, atol=5e-3)
    assert err < 5e-2


def test_compiled_training_curve_follows_eager_on_cuda(wide_llama_dir):
    """Ten AdamW steps on one batch (the benchmark's setting): compiled and eager curves agree."""
    x = torch.randint(0, WIDE_VOCAB, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    curves = {}
    for compile in (False, True):
        model = _model(wide_llama_dir, compile)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        losses = []
        for _ in range(10):
            loss, _ = _step(model, x)
            opt.step()
            losses.append(loss.item())
        curves[compile] = torch.tensor(losses)
        del model, opt
    print("eager   ", [round(v, 4) for v in curves[False].tolist()])
    print("compiled", [round(v, 4) for v in curves[True].tolist()])
    drop_e = curves[False][0] - curves[False][-1]
    drop_c = curves[True][0] - curves[True][-1]
    assert drop_e > 0
    torch.testing.assert_close(curves[True], curves[False], rtol=0, atol=max(2e-2, 0.1 * drop_e.item()))
    assert abs(drop_c - drop_e) < 0.15 * drop_e


def test_compiled_generation_follows_eager_on_cuda(tiny_llama_i128_dir):
    """Compiled generation as the bench runs it (bf16 autocast, greedy): the decode steps' 4-bit linears are bnb's
    own op inside the graphs and their RMSNorms run eagerly; the logits of every step follow eager's, with no
    graph break."""
    model = _model(tiny_llama_i128_dir, compile=True)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B so the adapters show in the logits
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    x = torch.randint(0, 320, (1, 12), device="cuda")
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = model.generate(input_ids=x, **gen).logits
        with eager(model):
            want = model.generate(input_ids=x, **gen).logits
    for a, b in zip(got, want):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 2e-2, err
    rep = compile_report(model)
    assert rep.graph_breaks == 0, rep.break_reasons
    assert rep.eager_calls.get("rms_norm (decode)", 0) > 0
