"""The fused QLoRA q/k/v projections (``fastllm.ops.lora_qkv``) against the dense maths through autograd."""

import pytest
import torch

from fastllm.ops import dequantize_nf4
from fastllm.ops.lora_qkv import lora_qkv

from .test_lora_mlp import _adapter, _params4bit

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "torch"), (torch.bfloat16, "torch"),
                                           (torch.float32, "triton")])  # triton: the interpreter on CPU
# (B, T, H, Nq, Nkv, r); a rank per projection as PEFT's rank_pattern gives (the shared x @ [Aq; Ak; Av].T splits)
@pytest.mark.parametrize("shape", [(2, 9, 128, 128, 64, 8), (1, 5, 64, 192, 64, (4, 2, 6))])
def test_fused_qkv_matches_dense_maths(dtype, backend, shape):
    b, t, hid, nq, nkv, r = shape
    outs = (nq, nkv, nkv)
    weights = [_params4bit(n, hid, i) for i, n in enumerate(outs)]
    dense = [dequantize_nf4(w.data, w.quant_state, backend="torch").float() for w in weights]
    ranks = r if isinstance(r, tuple) else (r,) * 3
    adapters = [_adapter(n, hid, ranks[i], 3 + i) for i, n in enumerate(outs)]
    scales = (1.0, 0.5, 1.5)  # 1.0: lora_alpha == r, where the backward skips its scaling launches
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(b, t, hid, generator=g) * 0.5).to(dtype)
    dys = [torch.randn(b, t, n, generator=g).to(dtype) for n in outs]

    leaves = [x.clone().requires_grad_()] + [p.clone().requires_grad_() for ab in adapters for p in ab]
    parts = [(w, leaves[1 + 2 * i], leaves[2 + 2 * i], scales[i]) for i, w in enumerate(weights)]
    ys = lora_qkv(leaves[0], *parts, backend=backend)
    torch.autograd.backward(ys, dys)

    ref = [x.float().requires_grad_()] + [p.clone().requires_grad_() for ab in adapters for p in ab]
    ys_ref = [ref[0] @ dense[i].t() + scales[i] * (ref[0] @ ref[1 + 2 * i].t()) @ ref[2 + 2 * i].t()
              for i in range(3)]
    torch.autograd.backward(ys_ref, [d.float() for d in dys])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for y, y_ref, n in zip(ys, ys_ref, outs):
        assert y.dtype == dtype and y.shape == (b, t, n)
        torch.testing.assert_close(y.float(), y_ref, **tol)
    names = ["x", "A_q", "B_q", "A_k", "B_k", "A_v", "B_v"]
    for got, want, name in zip(leaves, ref, names):
        assert got.grad.dtype == got.dtype, name
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1),
                                   msg=name)


def test_unused_output_gets_no_gradient_path():
    weights = [_params4bit(n, 64, i) for i, n in enumerate((64, 32, 32))]
    adapters = [[p.requires_grad_() for p in _adapter(n, 64, 4, 3 + i)] for i, n in enumerate((64, 32, 32))]
    x = torch.randn(3, 64, requires_grad=True)
    q, k, v = lora_qkv(x, *[(w, a, b, 1.0) for w, (a, b) in zip(weights, adapters)], backend="torch")
    (q.sum() + k.sum()).backward()  # v unused
    assert adapters[2][0].grad is None and adapters[2][1].grad is None
    assert adapters[0][0].grad is not None and x.grad is not None


def test_fused_qkv_rejects_mismatched_weights():
    w = _params4bit(32, 64, 0)
    a, b = _adapter(32, 64, 4, 1)
    with pytest.raises(ValueError, match="do not take x"):
        lora_qkv(torch.randn(2, 128), (w, a, b, 1.0), (w, a, b, 1.0), (w, a, b, 1.0))
