"""SwiGLU Triton kernels (interpreter on CPU) against eager ``F.silu(g) * u`` autograd."""

import pytest
import torch
import torch.nn.functional as F

from fastllm.ops.swiglu import geglu, swiglu

# On a GPU machine the kernels run for real on CUDA; elsewhere through the Triton interpreter on the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


# the gated ops and eager's activation: SwiGLU (Llama, Qwen, Mistral) and GeGLU (Gemma's gelu_pytorch_tanh)
ACTS = {"silu": (swiglu, F.silu), "gelu_tanh": (geglu, lambda g: F.gelu(g, approximate="tanh"))}


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 160), (1025,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gated_op_matches_eager(act, backend, shape, dtype):
    op, eager_act = ACTS[act]
    g = (torch.randn(shape, device=DEV) * 4).to(dtype)
    u = torch.randn(shape, device=DEV).to(dtype)
    g1, u1 = g.clone().requires_grad_(), u.clone().requires_grad_()
    g2, u2 = g.float().requires_grad_(), u.float().requires_grad_()
    h1 = op(g1, u1, backend=backend)
    h2 = eager_act(g2) * u2
    assert h1.dtype == dtype
    torch.testing.assert_close(h1.float(), h2, **TOL[dtype])
    dh = torch.randn(shape, device=DEV)
    h1.backward(dh.to(dtype))
    h2.backward(dh)
    torch.testing.assert_close(g1.grad.float(), g2.grad, **TOL[dtype])
    torch.testing.assert_close(u1.grad.float(), u2.grad, **TOL[dtype])


def test_swiglu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5))


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("m,inter", [(5, 123), (3, 1030)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gated_op_matches_eager(act, backend, m, inter, dtype):
    """The MLP's form: gu (M, 2I) = [g | u] from one stacked GEMM; h (M, I) and dgu = [dg | du]."""
    from fastllm.ops.swiglu import swiglu_packed_backward, swiglu_packed_forward

    gu = (torch.randn(m, 2 * inter, device=DEV) * 3).to(dtype)
    ref = gu.float().requires_grad_()
    h_ref = ACTS[act][1](ref[:, :inter]) * ref[:, inter:]
    dh = torch.randn(m, inter, device=DEV)
    h_ref.backward(dh)
    use_triton, gelu = backend == "triton", act == "gelu_tanh"
    h = swiglu_packed_forward(gu, use_triton, gelu)
    dgu = swiglu_packed_backward(dh.to(dtype), gu, use_triton, gelu)
    assert h.shape == (m, inter) and h.dtype == dtype and dgu.shape == gu.shape and dgu.dtype == dtype
    torch.testing.assert_close(h.float(), h_ref, **TOL[dtype])
    torch.testing.assert_close(dgu.float(), ref.grad, **TOL[dtype])
    # in place over gu (the fused MLP's backward): the same values, in gu's own buffer
    gu2 = gu.clone()
    out = swiglu_packed_backward(dh.to(dtype), gu2, use_triton, gelu, inplace=True)
    assert out.data_ptr() == gu2.data_ptr()
    torch.testing.assert_close(out, dgu, rtol=0, atol=0)

