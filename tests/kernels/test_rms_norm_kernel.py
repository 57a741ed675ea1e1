"""RMSNorm Triton kernels (through the interpreter on CPU) against the torch maths, forward and backward."""

import pytest
import torch

from fastllm.ops.rms_norm import _rms_norm_torch, rms_norm

# On a GPU machine the kernels run for real on CUDA; elsewhere through the Triton interpreter on the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 64), (1, 1000), (7, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_triton_matches_torch(shape, dtype, weight_grad):
    x = torch.randn(shape, dtype=dtype, device=DEV) * 3
    w = (torch.rand(shape[-1], device=DEV) + 0.5).to(dtype).requires_grad_(weight_grad)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_(weight_grad)
    y1 = rms_norm(x1, w, 1e-6, backend="triton")
    y2 = _rms_norm_torch(x2.float(), w2.float(), 1e-6)  # fp32 reference
    torch.testing.assert_close(y1.float(), y2, **TOL[dtype])
    dy = torch.randn_like(y2)
    y1.backward(dy.to(y1.dtype))
    y2.backward(dy)
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), **TOL[dtype])
    if weight_grad:
        torch.testing.assert_close(w.grad.float(), w2.grad.float(), **{k: v * 10 for k, v in TOL[dtype].items()})


def test_rms_norm_triton_without_cuda_or_interpreter_raises(monkeypatch):
    """CPU tensors with backend='triton' and no interpreter: a clear error, not a crash."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rms_norm(torch.randn(2, 8), torch.ones(8), backend="triton")
