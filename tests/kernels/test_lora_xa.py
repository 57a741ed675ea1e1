"""The adapters' decode-step input ``xa = x @ A.T`` as K-split partials (``fastllm.kernels.lora_xa``) against the
matmul of x with the adapters cast to x's dtype; and the NF4 GEMVs taking those partials and fp32 B masters (summed
and rounded in their LoRA term) against the same GEMVs given xa and B already in x's dtype. Odd ranks and K, one
row (CUDA cores) and several (tensor cores); through the Triton interpreter on the CPU (fp32, fp16)."""

import pytest
import torch
import torch.nn.functional as F

from fastllm._compat import triton_usable

pytestmark = pytest.mark.skipif(not triton_usable(), reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
bnb = pytest.importorskip("bitsandbytes")

from fastllm.kernels.lora_xa import lora_xa, xa_split  # noqa: E402
from fastllm.ops.nf4_gemv import nf4_gemv, nf4_glu_gemv, nf4_group_gemv  # noqa: E402

from .test_nf4_gemv import DEVICE, quantized, reference, tol  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _adapters(ranks, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, k, generator=g) * 0.1).to(DEVICE) for r in ranks]  # fp32 masters


def _xa_ref(x, adapters):
    return torch.cat([x.float() @ a.to(x.dtype).float().t() for a in adapters], dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,ranks", [(1, 64, (5,)), (3, 192, (4, 6, 2)), (1, 4096, (16, 16, 16)),
                                       (17, 320, (8, 3)), (6, 1216, (16,))])
def test_partials_sum_to_x_times_cast_adapters(m, k, ranks, dtype):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    adapters = _adapters(ranks, k)
    part = lora_xa(x, adapters)
    assert part.shape == (xa_split(k, m), m, sum(ranks)) and part.dtype == torch.float32
    torch.testing.assert_close(part.sum(0), _xa_ref(x, adapters), rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_split_follows_k_and_rows():
    assert [xa_split(4096, m) for m in (1, 4, 8, 32)] == [32, 32, 16, 8]
    assert xa_split(14336, 1) == 28 and xa_split(64, 1) == 1  # 112 steps of 128, 4 a range; one step


def test_lora_xa_refuses_what_it_cannot_take():
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="1 to 3 adapters"):
        lora_xa(x, _adapters((2, 2, 2, 2), 64))
    with pytest.raises(ValueError, match="contiguous"):
        lora_xa(x, [torch.randn(64, 4, device=DEVICE).t()])
    with pytest.raises(ValueError, match="unit stride"):
        lora_xa(torch.randn(64, 2, device=DEVICE).t(), _adapters((2,), 64))


def _rounded(part, dtype):
    return part.sum(0).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bs", [(1, 123, 192, 64), (5, 40, 1024, 64), (33, 24, 256, 128)])
def test_gemv_takes_partials_and_fp32_b(m, n, k, bs, dtype):
    packed, state, dense = quantized(n, k, bs, nested=True)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    (a,) = _adapters((7,), k, seed=1)
    b = (torch.randn(n, 7) * 0.1).to(DEVICE)
    part = lora_xa(x, [a])
    got = nf4_gemv(x, packed, state, None, (part, b, 0.5), backend="triton")
    want = reference(x, dense, None, (_rounded(part, dtype), b.to(dtype), 0.5))
    torch.testing.assert_close(got, want, **tol(dtype, k))
    torch.testing.assert_close(nf4_gemv(x, packed, state, None, (part, b, 0.5), backend="torch"), want,
                               **tol(dtype, k))


@pytest.mark.parametrize("m", [1, 6])
def test_group_and_glu_take_one_buffer_of_partials(m):
    dtype, k = torch.float32, 256
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    ns, ranks = (64, 16, 16), (4, 6, 2)
    adapters = _adapters(ranks, k, seed=2)
    part = lora_xa(x, adapters)
    offs = [0, 4, 10, 12]
    xa_all = _rounded(part, dtype)  # one buffer, split per adapter (the unfused path's layout)
    items, plain = [], []
    for i, n in enumerate(ns):
        packed, state, _ = quantized(n, k, 64, nested=True)
        b = (torch.randn(n, ranks[i]) * 0.1).to(DEVICE)
        view = part[:, :, offs[i]:offs[i + 1]]
        items.append((packed, state, None, (view, b, 0.5 + i)))
        plain.append((packed, state, None, (xa_all[:, offs[i]:offs[i + 1]], b, 0.5 + i)))
    for g, want in zip(nf4_group_gemv(x, items, backend="triton"), nf4_group_gemv(x, plain, backend="triton")):
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-6)
    (pg, sg, _), (pu, su, _) = quantized(48, k, 64, False), quantized(48, k, 64, False)
    bg, bu = (torch.randn(48, r, device=DEVICE) * 0.1 for r in ranks[:2])
    gu = lora_xa(x, adapters[:2])
    got = nf4_glu_gemv(x, (pg, sg, (gu[:, :, :4], bg, 2.0)), (pu, su, (gu[:, :, 4:], bu, 2.0)), backend="triton")
    xa = _rounded(gu, dtype)
    want = nf4_glu_gemv(x, (pg, sg, (xa[:, :4], bg, 2.0)), (pu, su, (xa[:, 4:], bu, 2.0)), backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    ref = F.silu(nf4_gemv(x, pg, sg, None, (xa[:, :4], bg, 2.0), backend="torch")) * \
        nf4_gemv(x, pu, su, None, (xa[:, 4:], bu, 2.0), backend="torch")
    torch.testing.assert_close(got, ref, **tol(dtype, k))
