"""RMSNorm Triton kernels (through the interpreter on CPU) against the torch maths, forward and backward."""

import pytest
import torch

from fastllm.ops.rms_norm import _rms_norm_torch, rms_norm

# On a GPU machine the kernels run for real on CUDA; elsewhere through the Triton interpreter on the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


# (300, 128), (3, 40, 96): narrow rows as per-head q/k norms have them, many rows per program in partial tiles
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 64), (1, 1000), (7, 1), (300, 128), (3, 40, 96)])
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


@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 64), (7, 1), (3, 40, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_gemma_form_matches_transformers_gemma3_rms_norm(shape, dtype, weight_grad):
    """offset=1: ``Gemma3RMSNorm`` (x * rstd * (1 + w) in fp32, rounded once to x's dtype), forward and backward,
    Triton and the torch fallback, against transformers' own module."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    ref = Gemma3RMSNorm(shape[-1], eps=1e-6).to(DEV)
    with torch.no_grad():
        ref.weight.normal_(0, 0.5)  # Gemma's weights sit around 0: the 1 + w is what matters
    ref.weight.requires_grad_(weight_grad)
    x = torch.randn(shape, dtype=dtype, device=DEV) * 3
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    for backend in ("triton", "torch"):
        w = ref.weight.detach().clone().requires_grad_(weight_grad)
        x1 = x.clone().requires_grad_()
        y = rms_norm(x1, w, 1e-6, offset=1.0, backend=backend)
        assert y.dtype == dtype
        tol = dict(atol=0, rtol=0) if backend == "torch" else TOL[dtype]
        torch.testing.assert_close(y, y_ref, **tol)
        y.backward(dy)
        torch.testing.assert_close(x1.grad, x_ref.grad, **TOL[dtype])
        if weight_grad:
            torch.testing.assert_close(w.grad.float(), ref.weight.grad.float(),
                                       **{k: v * 10 for k, v in TOL[dtype].items()})


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_head_rows_read_in_place_from_a_fused_qkv_output(offset, dtype):
    """``rms_norm_forward`` / ``rms_norm_backward`` on (M, heads, head_dim) views of the q or k columns of a wider
    (M, Nq + Nk + Nv) tensor (the fused layer's per-head q/k norms) equal the same norm on contiguous copies, bit for
    bit, with the views' memory untouched; the torch fallback agrees."""
    from fastllm.ops.rms_norm import rms_norm_backward, rms_norm_forward

    m, nq, nk, d = 37, 5, 2, 24
    qkv = (torch.randn(m, (nq + 2 * nk) * d, device=DEV) * 2).to(dtype)
    before = qkv.clone()
    w = (torch.rand(d, device=DEV) + 0.5).to(dtype)
    for start, heads in ((0, nq), (nq * d, nk)):
        view = qkv[:, start:start + heads * d].view(m, heads, d)
        dy = torch.randn(m * heads, d, device=DEV).to(dtype)
        outs = []
        for x, use_triton in ((view, True), (view.reshape(-1, d).contiguous(), True), (view, False)):
            y, st = rms_norm_forward(x, w, 1e-6, use_triton, offset)
            outs.append((y, rms_norm_backward(dy, st, use_triton)))
        (y, dx), (yc, dxc), (yt, dxt) = outs
        assert y.shape == dx.shape == (m * heads, d)
        torch.testing.assert_close(y, yc, rtol=0, atol=0)
        torch.testing.assert_close(dx, dxc, rtol=0, atol=0)
        torch.testing.assert_close(y.float(), yt.float(), **TOL[dtype])
        torch.testing.assert_close(dx.float(), dxt.float(), **TOL[dtype])
    torch.testing.assert_close(qkv, before, rtol=0, atol=0)
