"""The decode-step QLoRA op (``fastllm.ops.lora.lora_decode``): bitsandbytes' own 4-bit GEMV op (it runs on the
CPU too) plus the rank-r terms, against the dense maths."""

import pytest
import torch

from fastllm._compat import triton_usable
from fastllm.ops import dequantize_nf4
from fastllm.ops.lora import decode_states, lora_decode, lora_decode_glu, set_fused_xa

from .test_lora_mlp import _adapter, _params4bit

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("outs,ranks,with_bias", [((192, 64, 64), (4, 2, 6), False), ((320,), (8,), True),
                                                  ((96, 160), (3, 5), True)])
def test_decode_matches_dense_maths(dtype, tol, outs, ranks, with_bias):
    k = 128
    weights = [_params4bit(n, k, i) for i, n in enumerate(outs)]
    adapters = [_adapter(n, k, r, 7 + i) for i, (n, r) in enumerate(zip(outs, ranks))]  # fp32 masters
    scales = [1.0, 0.5, 2.0][: len(outs)]
    g = torch.Generator().manual_seed(3)
    biases = [torch.randn(n, generator=g) for n in outs] if with_bias else None
    x = torch.randn(1, 1, k, generator=g).to(dtype)
    states = decode_states(weights)
    assert states is not None
    parts = [(w, a, b, s) for w, (a, b), s in zip(weights, adapters, scales)]
    with torch.no_grad():
        ys = lora_decode(x, parts, states, biases)
    for i, (y, w, (a, b), s) in enumerate(zip(ys, weights, adapters, scales)):
        dense = dequantize_nf4(w.data, w.quant_state, backend="torch").float()
        ref = x.float() @ dense.t() + s * (x.float() @ a.t()) @ b.t()
        if with_bias:
            ref = ref + biases[i]
        assert y.shape == (1, 1, outs[i]) and y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    if dtype == torch.bfloat16:  # under autocast at x's dtype (how generation runs): the very same numbers
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ys_auto = lora_decode(x, parts, states, biases)
        for y, y_auto in zip(ys, ys_auto):
            torch.testing.assert_close(y_auto, y, rtol=0, atol=0)


def test_decode_states_refuse_what_the_gemv_cannot_take():
    # bnb's GEMV wants in_features a multiple of the blocksize: 96 is not (blocksize 64)
    assert decode_states([_params4bit(64, 96, 0)]) is None
    assert decode_states([_params4bit(64, 128, 0), _params4bit(64, 96, 1)]) is None
    assert decode_states([_params4bit(64, 128, 0)]) is not None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("outs,with_bias,gelu", [((96, 96), False, False), ((96, 96), False, True),
                                                 ((160, 32, 32), True, False)])
def test_gemv_kind_matches_dense_maths_for_several_rows(dtype, tol, outs, with_bias, gelu, backend):
    """States of kind "gemv" (fastllm's NF4 GEMV: its torch fallback, and the kernels with the adapters' xa from
    ``kernels.lora_xa``, through the interpreter on the CPU) for a batch of token rows: a q/k/v-like group with
    biases (Qwen2), a gate/up pair as one call equal to act(gate) * up of the group (SiLU, or Gemma's GELU-tanh)."""
    if backend == "triton" and not triton_usable("cpu"):  # CPU weights: the interpreter (GPUs: test_gpu_gemv.py)
        pytest.skip("needs TRITON_INTERPRET=1")
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter mishandles bf16 arithmetic (tests/kernels run fp32 and fp16 there)")
    k, ranks = 128, (4, 6, 2)
    weights = [_params4bit(n, k, i) for i, n in enumerate(outs)]
    adapters = [_adapter(n, k, r, 7 + i) for i, (n, r) in enumerate(zip(outs, ranks))]
    parts = [(w, a, b, s) for w, (a, b), s in zip(weights, adapters, (0.5, 2.0, 1.0))]
    _, states = decode_states(weights)  # (kind "bnb" on the CPU: one row); the same states serve the GEMV
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 1, k, generator=g).to(dtype)
    biases = [torch.randn(n, generator=g).to(dtype) for n in outs] if with_bias else None
    set_fused_xa(backend == "triton")  # the kernels with kernels.lora_xa's partials (opt-in), else cast + GEMM
    try:
        with torch.no_grad():
            ys = lora_decode(x, parts, ("gemv", states), biases, backend)
            h = lora_decode_glu(x, parts[:2], ("gemv", states[:2]), gelu, backend) if len(outs) == 2 else None
    finally:
        set_fused_xa(None)
    for i, (y, w, (a, b), (*_, s)) in enumerate(zip(ys, weights, adapters, parts)):
        dense = dequantize_nf4(w.data, w.quant_state, backend="torch").float()
        ref = x.float() @ dense.t() + s * (x.float() @ a.t()) @ b.t() + (biases[i].float() if with_bias else 0)
        assert y.shape == (5, 1, outs[i]) and y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    if h is not None:
        act = (lambda t: torch.nn.functional.gelu(t, approximate="tanh")) if gelu else torch.nn.functional.silu
        torch.testing.assert_close(h.float(), (act(ys[0].float()) * ys[1].float()), rtol=tol, atol=tol)
        if not gelu and backend == "torch":  # the kernel's SiLU (exp, divide) may differ from torch's by an ulp
            torch.testing.assert_close(h, torch.nn.functional.silu(ys[0]) * ys[1], rtol=0, atol=0)
    assert lora_decode_glu(x, parts[:2], ("bnb", states[:2])) is None  # bnb's GEMV has no fused pair
    assert decode_states(weights, 2) is None  # on the CPU: bnb's GEMV takes one row only


def test_fused_xa_switch_picks_the_path(monkeypatch):
    """``set_fused_xa(True)`` (the bench's ``fastllm:xa=fused``) runs ``kernels.lora_xa``; the default casts the
    adapters and runs a GEMM: both give the same outputs (fp32: to rounding)."""
    if not triton_usable("cpu"):  # CPU weights: the interpreter (GPUs: test_gpu_gemv.py)
        pytest.skip("needs TRITON_INTERPRET=1")
    import fastllm.ops.lora as lora_ops

    k, outs, ranks = 128, (64, 32), (4, 6)
    weights = [_params4bit(n, k, i) for i, n in enumerate(outs)]
    adapters = [_adapter(n, k, r, 3 + i) for i, (n, r) in enumerate(zip(outs, ranks))]
    parts = [(w, a, b, 0.5) for w, (a, b) in zip(weights, adapters)]
    _, states = decode_states(weights)
    x = torch.randn(3, 1, k, generator=torch.Generator().manual_seed(5))
    calls = []
    real = lora_ops._lora_xa()
    monkeypatch.setattr(lora_ops, "_LORA_XA", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        gemm = lora_ops.lora_decode(x, parts, ("gemv", states), backend="triton")
        assert not calls
        set_fused_xa(True)
        try:
            fused = lora_ops.lora_decode(x, parts, ("gemv", states), backend="triton")
        finally:
            set_fused_xa(None)
    assert len(calls) == 1
    for a, b in zip(fused, gemm):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
