"""nf4_linear4bit_forward bound on a real bnb Linear4bit (under a PEFT LoRA adapter) vs bnb's forward."""

import copy
import types

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from fastllm.modules.nf4_linear import nf4_linear4bit_forward, nf4_linear_eligible  # noqa: E402


# in_features is a multiple of the blocksize: bnb 0.50's own CPU forward is wrong otherwise (its native
# CPU dequant restarts blocks per row; see tests/kernels/test_nf4_dequant.py), and it is the reference.
class Block(torch.nn.Module):
    def __init__(self, k=128, n=48, bias=True, compute_dtype=torch.float32, quant_type="nf4"):
        super().__init__()
        self.proj = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type)

    def forward(self, x):
        return self.proj(x)


def quantized_block(device="cpu", **kw):
    m = Block(**kw).to(device)  # .to() quantizes the Params4bit
    for mod in m.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False  # see shared/FACTS.md: the CPU repack breaks training
    return m


def lora(model):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # non-zero B so the adapter contributes
    return model


def test_eligibility_reasons():
    assert nf4_linear_eligible(torch.nn.Linear(4, 4)) == "not a bitsandbytes Linear4bit"
    assert "not quantized" in nf4_linear_eligible(bnb.nn.Linear4bit(64, 8, quant_type="nf4"))
    assert "fp4" in nf4_linear_eligible(quantized_block(quant_type="fp4").proj)
    assert nf4_linear_eligible(quantized_block().proj) is None


@pytest.mark.parametrize("compute_dtype,x_dtype", [(torch.float32, torch.float32),
                                                   (torch.bfloat16, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16)])
def test_patched_peft_lora_matches_unpatched(compute_dtype, x_dtype):
    torch.manual_seed(0)
    ref = lora(quantized_block(compute_dtype=compute_dtype))
    fast = copy.deepcopy(ref)
    base = fast.base_model.model.proj.base_layer
    assert isinstance(base, bnb.nn.Linear4bit) and nf4_linear_eligible(base) is None
    base.forward = types.MethodType(nf4_linear4bit_forward, base)
    assert base.forward.__func__ is nf4_linear4bit_forward

    x = torch.randn(2, 7, 128, dtype=x_dtype)
    outs = []
    for model in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.float().square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        outs.append((y, xi.grad, grads))
    (y0, dx0, g0), (y1, dx1, g1) = outs
    tols = {} if compute_dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert y1.dtype == y0.dtype == x_dtype
    torch.testing.assert_close(y1, y0, **tols)
    torch.testing.assert_close(dx1, dx0, **tols)
    assert g0.keys() == g1.keys() and any("lora_A" in k for k in g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], **tols)

    with fast.disable_adapter(), ref.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), **tols)


def test_bias_is_cast_like_bitsandbytes():
    m = quantized_block(compute_dtype=torch.bfloat16)
    twin = copy.deepcopy(m)
    m.proj.forward = types.MethodType(nf4_linear4bit_forward, m.proj)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y, y_ref = m(x), twin(x)
    assert m.proj.bias.dtype == twin.proj.bias.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_patched_peft_lora_matches_unpatched():
    torch.manual_seed(0)
    ref = lora(quantized_block("cuda", k=4096, n=1024, compute_dtype=torch.bfloat16))
    fast = copy.deepcopy(ref)
    base = fast.base_model.model.proj.base_layer
    base.forward = types.MethodType(nf4_linear4bit_forward, base)
    x = torch.randn(2, 128, 4096, dtype=torch.bfloat16, device="cuda")
    res = []
    for model in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.float().square().mean().backward()
        res.append((y, xi.grad, model.base_model.model.proj.lora_A.default.weight.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
