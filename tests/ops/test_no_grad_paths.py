"""Without a graph to record (inference, decode) RMSNorm, RoPE and SwiGLU skip their autograd.Function and run
the kernel alone: the output must equal the recorded path's and transformers' maths."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from fastllm.ops.rms_norm import rms_norm
from fastllm.ops.rope import rope
from fastllm.ops.swiglu import swiglu

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(1, 1, 96), (2, 7, 96)])  # one decode token, and an odd prefill
def test_rms_norm_no_grad_equals_recorded(backend, shape):
    ref = LlamaRMSNorm(96, eps=1e-5).to(DEV)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    x = torch.randn(*shape, device=DEV)
    recorded = rms_norm(x.clone().requires_grad_(), ref.weight, 1e-5, backend=backend)
    with torch.no_grad():
        y = rms_norm(x, ref.weight, 1e-5, backend=backend)
        torch.testing.assert_close(y, ref(x), atol=1e-6, rtol=1e-6)
    assert y.grad_fn is None and recorded.grad_fn is not None
    torch.testing.assert_close(y, recorded.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("t", [1, 5])
def test_rope_no_grad_equals_recorded(backend, t):
    q, k = torch.randn(2, t, 4, 16, device=DEV), torch.randn(2, t, 2, 16, device=DEV)
    ang = torch.randn(1, t, 8, device=DEV)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    qr, kr = rope(q.clone().requires_grad_(), k.clone().requires_grad_(), cos, sin, backend=backend)
    with torch.no_grad():
        qn, kn = rope(q, k, cos, sin, backend=backend)
    assert qn.grad_fn is None and qr.grad_fn is not None
    torch.testing.assert_close((qn, kn), (qr.detach(), kr.detach()), atol=0, rtol=0)
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    torch.testing.assert_close((qn, kn), (q_ref.transpose(1, 2), k_ref.transpose(1, 2)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_swiglu_no_grad_equals_recorded(backend):
    g, u = torch.randn(3, 2 * 37, device=DEV)[:, ::2], torch.randn(3, 37, device=DEV)  # g not contiguous
    recorded = swiglu(g.clone().requires_grad_(), u, backend=backend)
    with torch.no_grad():
        h = swiglu(g, u, backend=backend)
    assert h.grad_fn is None and recorded.grad_fn is not None
    torch.testing.assert_close(h, recorded.detach(), atol=0, rtol=0)
    torch.testing.assert_close(h, torch.nn.functional.silu(g) * u, atol=1e-6, rtol=1e-6)
