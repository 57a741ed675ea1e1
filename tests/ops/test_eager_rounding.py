"""fastllm's SwiGLU and RoPE round where transformers' op-by-op maths rounds: the same bits as eager in 16-bit
dtypes (decode logits would otherwise drift from eager's over many steps). Torch fallbacks in bf16 and fp16,
Triton kernels through the interpreter in fp16 (its bf16 casts truncate) and fp32."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fastllm.ops.rope import rope
from fastllm.ops.swiglu import swiglu

CASES = [("torch", torch.bfloat16), ("torch", torch.float16), ("triton", torch.float16), ("triton", torch.float32)]


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("shape", [(3, 7, 123), (2, 64)])
def test_swiglu_forward_and_grads_are_eagers_bits(backend, dtype, shape):
    g = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    u = torch.randn(shape).to(dtype).requires_grad_()
    dh = torch.randn(shape).to(dtype)
    out = swiglu(g, u, backend=backend)
    dg, du = torch.autograd.grad(out, (g, u), dh)
    ref = F.silu(g) * u
    rg, ru = torch.autograd.grad(ref, (g, u), dh)
    if dtype == torch.float32:  # exp differs between libraries by fp32 ulps; 16-bit rounding hides that
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(du, ru, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, ref)
        assert torch.equal(du, ru)
    torch.testing.assert_close(dg, rg, rtol=1e-2, atol=1e-3)  # silu's backward formula differs by fp32 ulps


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("B,T,nq,nk,D", [(2, 5, 4, 2, 16), (1, 3, 3, 1, 128)])
def test_rope_forward_and_grads_are_eagers_bits(backend, dtype, B, T, nq, nk, D):
    q = torch.randn(B, T, nq, D).to(dtype).requires_grad_()
    k = torch.randn(B, T, nk, D).to(dtype).requires_grad_()
    angle = torch.rand(1, T, D // 2) * 6
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(dtype)
    qo, ko = rope(q, k, cos, sin, backend=backend)
    # transformers' layout is (B, heads, T, D) with cos/sin unsqueezed at dim 1
    rq, rk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.equal(qo, rq.transpose(1, 2)) and torch.equal(ko, rk.transpose(1, 2))
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    got = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    want = torch.autograd.grad((rq, rk), (q, k), (dq.transpose(1, 2), dk.transpose(1, 2)))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
