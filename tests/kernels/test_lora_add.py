"""The in-place LoRA term with PEFT's roundings (``fastllm.kernels.lora_add``) against torch's three-op path
(``ops.lora.add_lora_term(..., exact=True, backend="torch")``), through the Triton interpreter: one row (a decode
step) to a prefill's many (the tensor-core branch), odd N and ranks, scales 1 and not, a column block of a wider
output. fp32 sums of a different order and the interpreter's truncating bf16 cast allow one ulp per rounding."""

import pytest
import torch

from fastllm._compat import triton_usable
from fastllm.ops.lora import add_lora_term

pytestmark = pytest.mark.skipif(not triton_usable(), reason="needs Triton (a GPU or TRITON_INTERPRET=1)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("m,n,r,s", [(1, 4096, 16, 1.0), (1, 37, 8, 2.0), (3, 130, 33, 0.5), (16, 64, 16, 1.7),
                                     (40, 100, 16, 2.0)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lora_add_matches_the_three_op_path(m, n, r, s, dtype):
    if dtype == torch.bfloat16 and m > 16 and DEVICE == "cpu":
        pytest.skip("the interpreter's tl.dot mishandles bf16 (checked on the GPU: test_lora_add_bf16_on_cuda)")
    g = torch.Generator().manual_seed(m * 1000 + n + r)
    wide = torch.randn(m, n + 5, generator=g).to(dtype).to(DEVICE)
    y = wide[:, 2:n + 2]  # a column block of a wider buffer, as a stacked group's output
    xa = (torch.randn(m, r, generator=g) * 3).to(dtype).to(DEVICE)
    b = (torch.randn(n, r, generator=g) * 0.05).to(dtype).to(DEVICE)
    want = add_lora_term(y.clone(), xa, b, s, True, backend="torch")
    before = wide.clone()
    got = add_lora_term(y, xa, b, s, True, backend="triton")
    assert got.data_ptr() == y.data_ptr()
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
           torch.bfloat16: dict(rtol=2 ** -6, atol=2 ** -6)}[dtype]
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(wide[:, :2], before[:, :2]) and torch.equal(wide[:, n + 2:], before[:, n + 2:])


def test_lora_add_refuses_a_strided_row():
    from fastllm.kernels.lora_add import lora_add

    y = torch.zeros(4, 3, device=DEVICE).t()
    with pytest.raises(ValueError, match="unit last strides"):
        lora_add(y, torch.zeros(3, 2, device=DEVICE), torch.zeros(4, 2, device=DEVICE), 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 40, 2048])
def test_lora_add_bf16_on_cuda(m):
    test_lora_add_matches_the_three_op_path(m, 4096, 16, 2.0, torch.bfloat16)
