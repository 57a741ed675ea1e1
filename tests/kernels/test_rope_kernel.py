"""RoPE of q and k (Triton kernel through the interpreter on CPU, and the torch fallback) against transformers'
own ``apply_rotary_pos_emb`` through autograd."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fastllm.ops.rope import rope

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _cos_sin(batch, t, d, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(t, dtype=torch.float32)[None, :] + torch.arange(batch, dtype=torch.float32)[:, None] * 3
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)  # (batch, T, D), halves repeated as in Llama
    return emb.cos().to(DEV, dtype), emb.sin().to(DEV, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,t,nq,nk,d,cos_batch", [(2, 7, 5, 1, 64, 1), (1, 3, 4, 4, 96, 1), (3, 5, 17, 3, 32, 3)])
def test_rope_matches_transformers(backend, dtype, b, t, nq, nk, d, cos_batch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, t, nq, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, t, nk, d, generator=g).to(DEV, dtype)
    cos, sin = _cos_sin(cos_batch, t, d, dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = rope(q1, k1, cos, sin, backend=backend)
    torch.autograd.backward((qo, ko), (dq, dk))
    # transformers' layout is (B, heads, T, D); compute its reference in fp32 from the same inputs
    q2, k2 = q.float().requires_grad_(), k.float().requires_grad_()
    qr, kr = apply_rotary_pos_emb(q2.transpose(1, 2), k2.transpose(1, 2), cos.float(), sin.float())
    torch.autograd.backward((qr.transpose(1, 2), kr.transpose(1, 2)), (dq.float(), dk.float()))
    assert qo.dtype == ko.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    torch.testing.assert_close(qo.float(), qr.transpose(1, 2), **TOL[dtype])
    torch.testing.assert_close(ko.float(), kr.transpose(1, 2), **TOL[dtype])
    torch.testing.assert_close(q1.grad.float(), q2.grad, **TOL[dtype])
    torch.testing.assert_close(k1.grad.float(), k2.grad, **TOL[dtype])


def test_fp32_equals_transformers_bit_for_bit():
    q = torch.randn(2, 6, 4, 64, device=DEV)
    k = torch.randn(2, 6, 2, 64, device=DEV)
    cos, sin = _cos_sin(1, 6, 64, torch.float32)
    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    for backend in ("triton", "torch"):
        qo, ko = rope(q, k, cos, sin, backend=backend)
        assert torch.equal(qo, qr.transpose(1, 2)) and torch.equal(ko, kr.transpose(1, 2)), backend


def test_rope_rejects_bad_shapes():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="cos and sin of shape"):
        rope(q, k, torch.randn(1, 5, 8), torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="one even D"):
        rope(q, torch.randn(1, 4, 1, 6), torch.randn(1, 4, 8), torch.randn(1, 4, 8))


@pytest.mark.gpu
def test_gpu_rope_at_llama_shapes():
    """The CUDA kernel at Llama-3-8B attention shapes (bf16) against transformers, values and gradients."""
    q = torch.randn(2, 2048, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2048, 8, 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = (t.to("cuda") for t in _cos_sin(1, 2048, 128, torch.bfloat16))
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = rope(q1, k1, cos, sin, backend="triton")
    torch.autograd.backward((qo, ko), (dq, dk))
    q2, k2 = q.float().requires_grad_(), k.float().requires_grad_()
    qr, kr = apply_rotary_pos_emb(q2.transpose(1, 2), k2.transpose(1, 2), cos.float(), sin.float())
    torch.autograd.backward((qr.transpose(1, 2), kr.transpose(1, 2)), (dq.float(), dk.float()))
    for got, want in ((qo, qr.transpose(1, 2)), (ko, kr.transpose(1, 2)), (q1.grad, q2.grad), (k1.grad, k2.grad)):
        torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rope_reads_column_blocks_of_a_fused_qkv_output(backend):
    """q and k as column blocks of one (B, T, Nq + Nk + Nv) output (the fused q/k/v op's): read in place with
    their row stride, the same result as contiguous copies."""
    b, t, nq, nk, d = 2, 5, 3, 1, 32
    qkv = torch.randn(b, t, (nq + 2 * nk) * d, device=DEV)
    q, k, _ = qkv.split([nq * d, nk * d, nk * d], dim=-1)
    q, k = q.view(b, t, nq, d), k.view(b, t, nk, d)
    cos, sin = _cos_sin(1, t, d, torch.float32)
    qo, ko = rope(q, k, cos, sin, backend=backend)
    qc, kc = rope(q.contiguous(), k.contiguous(), cos, sin, backend=backend)
    assert not q.is_contiguous()
    torch.testing.assert_close(qo, qc, rtol=0, atol=0)
    torch.testing.assert_close(ko, kc, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("backward", [False, True])
def test_rope_in_place_on_column_blocks(backend, backward):
    """``rope_rotate(..., inplace=True)`` on q and k as column blocks of a fused q/k/v output (the fused layer's use):
    q and k rotated where they lie, the same bits as the out-of-place result, v's columns untouched; a non-view
    input (rows that cannot be flattened in place) falls back to new tensors."""
    from fastllm.ops.rope import rope_rotate, rope_tables

    b, t, nq, nk, d = 2, 5, 3, 2, 32
    qkv = torch.randn(b * t, (nq + 2 * nk) * d, device=DEV)
    before = qkv.clone()
    q, k, v = qkv.split([nq * d, nk * d, nk * d], dim=-1)
    cos, sin = _cos_sin(1, t, d, torch.float32)
    c, s = rope_tables(cos, sin)
    use_triton = backend == "triton"
    want_q, want_k = rope_rotate(q.view(b, t, nq, d), k.view(b, t, nk, d), c, s, use_triton, backward)
    got_q, got_k = rope_rotate(q.view(b, t, nq, d), k.view(b, t, nk, d), c, s, use_triton, backward, inplace=True)
    assert got_q.data_ptr() == qkv.data_ptr() and got_k.data_ptr() == qkv.data_ptr() + nq * d * qkv.element_size()
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
    torch.testing.assert_close(v, before[:, (nq + nk) * d:], rtol=0, atol=0)
    # (B, T, heads, D) as a transposed (B, heads, T, D): its rows cannot be flattened in place
    qt = torch.randn(b, nq, t, d, device=DEV).transpose(1, 2)
    kt = torch.randn(b, nk, t, d, device=DEV).transpose(1, 2)
    kept = qt.clone()
    out_q, _ = rope_rotate(qt, kt, c, s, use_triton, backward, inplace=True)
    assert out_q.data_ptr() != qt.data_ptr() and torch.equal(qt, kept)
    torch.testing.assert_close(out_q, rope_rotate(qt, kt, c, s, use_triton, backward)[0], rtol=0, atol=0)
