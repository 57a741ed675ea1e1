"""The fused CE kernel's closed-form loss and gradient against autograd (interpreter on the CPU)."""

import pytest
import torch
import torch.nn.functional as F

from fastllm.kernels.cross_entropy import cross_entropy_chunk

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# storage dtype -> (rtol, atol) of the gradient written back in that dtype
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-2, 2e-4), torch.bfloat16: (2e-2, 2e-3)}


def _reference(x, y, smoothing=0.0, z_loss=0.0, softcap=None, scale=None):
    """Per-row loss and dL/dx by autograd through F.cross_entropy on fp32 logits."""
    x = x.float().clone().requires_grad_(True)
    z = softcap * torch.tanh(x / softcap) if softcap else x
    loss = F.cross_entropy(z, y, reduction="none", label_smoothing=smoothing, ignore_index=-100)
    loss = loss + z_loss * torch.logsumexp(z, -1).square() * (y != -100)
    loss.backward(scale if scale is not None else torch.ones_like(loss))
    return loss.detach(), x.grad


@pytest.mark.parametrize("smoothing,z_loss,softcap", [(0.0, 0.0, None), (0.1, 0.0, None), (0.0, 1e-3, None),
                                                       (0.0, 0.0, 4.0), (0.2, 1e-2, 2.5)])
def test_closed_form_matches_autograd(smoothing, z_loss, softcap):
    x = torch.randn(7, 1001, device=DEV) * 3
    y = torch.randint(0, 1001, (7,), device=DEV)
    y[2] = -100
    ref_loss, ref_grad = _reference(x, y, smoothing, z_loss, softcap)
    buf = x.clone()
    loss, lse = cross_entropy_chunk(buf, y, label_smoothing=smoothing, z_loss=z_loss, logit_softcap=softcap)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(buf, ref_grad)  # written in place
    assert lse[2] == 0 and loss[2] == 0 and not buf[2].any()


def test_row_scale_and_no_grad_leaves_logits():
    x = torch.randn(5, 300, device=DEV)
    y = torch.randint(0, 300, (5,), device=DEV)
    scale = torch.randn(5, device=DEV)
    _, ref_grad = _reference(x, y, scale=scale)
    buf = x.clone()
    cross_entropy_chunk(buf, y, row_scale=scale)
    torch.testing.assert_close(buf, ref_grad)
    buf = x.clone()
    loss, _ = cross_entropy_chunk(buf, y, compute_grad=False)
    torch.testing.assert_close(buf, x, rtol=0, atol=0)
    torch.testing.assert_close(loss, _reference(x, y)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_storage(dtype):
    x = (torch.randn(6, 777, device=DEV) * 2).to(dtype)
    y = torch.randint(0, 777, (6,), device=DEV)
    ref_loss, ref_grad = _reference(x, y, smoothing=0.05)
    buf = x.clone()
    loss, _ = cross_entropy_chunk(buf, y, label_smoothing=0.05)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)  # fp32 arithmetic on the stored logits
    torch.testing.assert_close(buf.float(), ref_grad, rtol=rtol, atol=atol)


def test_rejects_strided_vocab_axis():
    with pytest.raises(ValueError, match="unit stride"):
        cross_entropy_chunk(torch.randn(8, 4, device=DEV).t(), torch.zeros(4, dtype=torch.long, device=DEV))


@pytest.mark.gpu
def test_gpu_large_vocab_bf16():
    x = (torch.randn(64, 128256, device="cuda") * 2).bfloat16()
    y = torch.randint(0, 128256, (64,), device="cuda")
    y[::9] = -100
    ref_loss, ref_grad = _reference(x, y, smoothing=0.1, z_loss=1e-4, softcap=30.0)
    buf = x.clone()
    loss, _ = cross_entropy_chunk(buf, y, label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(buf.float(), ref_grad, rtol=2e-2, atol=1e-6)
