"""``NF4Param`` (fastllm.integrations.nf4_fsdp) in one process: ops outside its allow-list raise, naming the op.

The structural ops FSDP2 runs on a parameter (split, slice, new_zeros, copy_, view, _to_copy, ...) are covered by
``tests/integrations/test_fsdp2.py``; the ops that run on the packed bytes (a dtype view, ``t``, bitsandbytes'
and fastllm's 4-bit custom ops) are what bnb's ``Linear4bit.forward`` and fastllm's NF4 linear reach.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")


def _nf4_param(out_features=160, in_features=64):
    import bitsandbytes as bnb

    from fastllm.integrations.nf4_fsdp import nf4_param_from_params4bit

    data = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.05
    w = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4", compress_statistics=True,
                          blocksize=64).to("cpu")
    return w, nf4_param_from_params4bit(w)


@pytest.mark.parametrize("op, name", [
    (lambda p: p * 2, "aten.mul.Tensor"),
    (lambda p: p.sum(), "aten.sum.default"),
    (lambda p: torch.flip(p, [0]), "aten.flip.default"),
    (lambda p: p + p, "aten.add.Tensor"),
    (lambda p: p.clone(), "aten.clone.default"),
    (lambda p: torch.mm(torch.ones(2, 5120), p), "aten.mm.default"),
    (lambda p: p.abs(), "aten.abs.default"),
    (lambda p: p.zero_(), "aten.zero_.default"),
])
def test_ops_outside_the_allow_list_raise_naming_the_op(op, name):
    _, p = _nf4_param()
    with pytest.raises(NotImplementedError) as err:
        op(p)
    msg = str(err.value)
    assert name in msg
    assert "NF4Param" in msg


def test_the_message_says_how_to_get_the_values():
    _, p = _nf4_param()
    with pytest.raises(NotImplementedError, match=r"NF4Param does not implement aten\.mul\.Tensor; dequantize first"):
        p * 2
    with pytest.raises(NotImplementedError, match="corrupt"):  # a cast has its own message
        p.float()


def test_byte_ops_run_on_the_packed_bytes():
    """What bnb's Linear4bit.forward and fastllm's dequant do with the weight: plain tensors over the same bytes."""
    import bitsandbytes.functional as bF

    from fastllm.ops.nf4 import dequantize_nf4

    w, p = _nf4_param()
    assert type(p.view(torch.uint8)) is torch.Tensor and torch.equal(p.view(torch.uint8), w.data)
    assert type(p.t()) is torch.Tensor and torch.equal(p.t(), w.data.t())
    dense = bF.dequantize_4bit(w.data, w.quant_state)
    # bitsandbytes' custom op receives the NF4Param itself and runs on its packed bytes
    torch.testing.assert_close(bF.dequantize_4bit(p, p.quant_state), dense, rtol=0, atol=0)  # bnb's custom op
    torch.testing.assert_close(dequantize_nf4(p, p.quant_state, backend="torch"), dense, rtol=0, atol=0)
    x = torch.randn(3, 64)
    y = torch.ops.fastllm.nf4_linear.default(x, p, *_args(p))
    torch.testing.assert_close(y, x @ dense.t(), rtol=1e-5, atol=1e-5)


def _args(p):
    from fastllm.ops.nf4 import state_args

    absmax, code, code2, absmax2, offset, bs, bs2, shape = state_args(p.quant_state)
    return absmax, code, code2, absmax2, offset, None, bs, bs2, shape
