"""nf4_linear4bit_forward bound on a real bnb Linear4bit (under a PEFT LoRA adapter) vs bnb's forward, and its
compiled twin nf4_linear4bit_compiled_forward (plain-tensor NF4 arguments, traced with fullgraph=True)."""

import copy
import types

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from fastllm.modules.nf4_linear import (  # noqa: E402
    NF4Alias,
    nf4_linear4bit_compiled_forward,
    nf4_linear4bit_forward,
    nf4_linear_eligible,
    refresh_nf4_aliases,
)


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


def _bind_compiled(base):
    """What the patch registry does for compile_nf4_linear (there it is recorded and reverted)."""
    base._fastllm_nf4 = NF4Alias(base)
    base.forward = types.MethodType(nf4_linear4bit_compiled_forward, base)


@pytest.mark.parametrize("compute_dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_compiled_forward_traces_plain_tensors_in_one_graph(compute_dtype, x_dtype):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    ref = lora(quantized_block(compute_dtype=compute_dtype))
    fast = copy.deepcopy(ref)
    base = fast.base_model.model.proj.base_layer
    _bind_compiled(base)
    args = base._fastllm_nf4.args
    # Traced code sees plain tensors only; the packed bytes are a view of the weight's storage, not a copy.
    assert all(type(t) is torch.Tensor for t in args[:6] if t is not None) and type(base.weight) is not torch.Tensor
    assert args.packed.untyped_storage().data_ptr() == base.weight.untyped_storage().data_ptr()
    block = fast.base_model.model  # Block: calls PEFT's LoRA Linear4bit, which calls our base forward
    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(2, 5, 128, dtype=x_dtype, requires_grad=True)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    y = torch.compile(block, backend="aot_eager", fullgraph=True)(x)  # fullgraph: any break raises
    (dx,) = torch.autograd.grad(y.sum(), x)
    y_ref = ref(x)
    (dx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    tols = {} if compute_dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y, y_ref, **tols)
    torch.testing.assert_close(dx, dx_ref, **tols)
    assert sum(counters["graph_break"].values()) == 0
    torch._dynamo.reset()


def test_compiled_forward_rereads_a_replaced_weight():
    torch.manual_seed(0)
    m, other = quantized_block(bias=False), quantized_block(bias=False)
    base = m.proj
    _bind_compiled(base)
    x = torch.randn(3, 128)
    before = base._fastllm_nf4.args
    refresh_nf4_aliases([base])
    assert base._fastllm_nf4.args is before  # unchanged weight: nothing re-read
    # What Module.to / FSDP do: new storage under the same Parameter object, quant state replaced.
    base.weight.data = other.proj.weight.data.clone()
    base.weight.quant_state = other.proj.weight.quant_state
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    refresh_nf4_aliases([base])  # the compiled regions' eager wrappers do this before every call
    assert base._fastllm_nf4.args.packed.data_ptr() == base.weight.data_ptr()
    assert base._fastllm_nf4.args.absmax is other.proj.weight.quant_state.absmax
    torch.testing.assert_close(compiled(x), other(x))
    # Called eagerly, the compiled forward refreshes by itself.
    base.weight.data = base.weight.data.clone()
    assert torch.equal(m(x), other(x)) and base._fastllm_nf4.args.packed.data_ptr() == base.weight.data_ptr()
    torch._dynamo.reset()


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


@pytest.mark.gpu
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_gpu_one_token_is_bitsandbytes_own_forward(compute_dtype):
    """Decode (one token, no grad): the patched forward hands over to bnb's 4-bit GEMV, so it equals bnb."""
    torch.manual_seed(0)
    ref = quantized_block("cuda", k=4096, n=1000, compute_dtype=compute_dtype)
    fast = copy.deepcopy(ref)
    fast.proj.forward = types.MethodType(nf4_linear4bit_forward, fast.proj)
    with torch.no_grad():
        for shape in [(1, 1, 4096), (1, 4096)]:
            x = torch.randn(shape, dtype=compute_dtype, device="cuda")
            assert torch.equal(fast(x), ref(x)), shape
        # Several tokens take the dequant + GEMM path: close to bnb, not bit-equal.
        x = torch.randn(1, 3, 4096, dtype=compute_dtype, device="cuda")
        torch.testing.assert_close(fast(x), ref(x), rtol=2e-2, atol=2e-2)
    # With grad, one token still runs fastllm's op (its backward re-dequantizes).
    x = torch.randn(1, 1, 4096, dtype=compute_dtype, device="cuda", requires_grad=True)
    y = fast(x)
    assert y.grad_fn is not None and "NF4" in type(y.grad_fn).__name__
