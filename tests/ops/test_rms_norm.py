"""fastllm's RMSNorm op against transformers' own LlamaRMSNorm module."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fastllm.ops.rms_norm import rms_norm


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_matches_transformers(backend, dtype, tol):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ref = LlamaRMSNorm(96, eps=1e-5).to(dtype=dtype, device=dev)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 11, 96, dtype=dtype, device=dev)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(x2)
    y = rms_norm(x1, ref.weight, ref.variance_epsilon, backend=backend)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    ref_wgrad = ref.weight.grad.clone()
    ref.weight.grad = None
    y.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=tol * 4, rtol=tol * 4)
    torch.testing.assert_close(ref.weight.grad, ref_wgrad, atol=tol * 40, rtol=tol * 4)


def test_rms_norm_torch_backend_is_bit_exact_with_transformers():
    ref = LlamaRMSNorm(64).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, ref.weight, ref.variance_epsilon, backend="torch"), ref(x))


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be"):
        rms_norm(torch.randn(2, 4), torch.ones(4), backend="cuda")
