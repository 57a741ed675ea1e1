"""The cast-and-concatenate kernel (``fastllm.kernels.cast_cat``) against ``torch.cat`` of the cast tensors, through
the Triton interpreter: odd sizes, one to more than ``MAX_SOURCES`` sources (several launches), mixed source dtypes,
signed zeros and NaNs kept. The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even, so bf16
outputs are checked within one ulp here (exactly on the GPU, ``test_cast_cat_bit_exact_on_cuda``)."""

import pytest
import torch

from fastllm._compat import triton_usable

pytestmark = pytest.mark.skipif(not triton_usable(), reason="needs Triton (a GPU or TRITON_INTERPRET=1)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sources(sizes, dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dt).to(DEVICE) for n, dt in zip(sizes, dtypes)]


@pytest.mark.parametrize("sizes", [(1,), (5, 3), (1000, 17, 4096, 1), (33,) * 8, (7, 1025, 3, 64, 9, 2, 11, 5, 300)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cast_cat_matches_torch_cat(sizes, out_dtype):
    from fastllm.kernels.cast_cat import cast_cat

    dtypes = [(torch.float32, torch.bfloat16, torch.float16)[i % 3] for i in range(len(sizes))]
    srcs = _sources(sizes, dtypes)
    out = torch.full((sum(sizes),), 7.0, dtype=out_dtype, device=DEVICE)
    got = cast_cat(srcs, out)
    want = torch.cat([s.to(out_dtype) for s in srcs])
    assert got is out
    if out_dtype == torch.bfloat16:
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cast_cat_keeps_signed_zeros_and_nans():
    from fastllm.kernels.cast_cat import cast_cat

    a = torch.tensor([-0.0, 0.0, float("nan"), -1.5], device=DEVICE)
    b = torch.tensor([float("-inf"), -0.0], device=DEVICE, dtype=torch.float16)
    out = cast_cat([a, b], torch.empty(6, device=DEVICE))
    want = torch.cat([a, b.float()])
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(torch.signbit(out), torch.signbit(want))
    torch.testing.assert_close(out, want, equal_nan=True, rtol=0, atol=0)


def test_cast_cat_refuses_a_wrong_out():
    from fastllm.kernels.cast_cat import cast_cat

    with pytest.raises(ValueError, match="exactly the sources' elements"):
        cast_cat([torch.zeros(3, device=DEVICE)], torch.empty(4, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous sources"):
        cast_cat([torch.zeros(4, 2, device=DEVICE).t()], torch.empty(8, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cast_cat_bit_exact_on_cuda():
    from fastllm.kernels.cast_cat import cast_cat

    sizes = (4096 * 16, 16 * 1024, 16 * 1024, 4096 * 16, 1024 * 16, 1024 * 16, 5, 3, 77)
    srcs = _sources(sizes, [torch.float32] * len(sizes))
    got = cast_cat(srcs, torch.empty(sum(sizes), dtype=torch.bfloat16, device="cuda"))
    assert torch.equal(got, torch.cat([s.to(torch.bfloat16) for s in srcs]))
