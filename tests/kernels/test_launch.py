"""``fastllm.kernels.launch``: the cached direct launch of Triton kernels.

On the CPU the interpreter path is Triton's own (checked by every kernel test); here the specialization key and
the argument order that the direct path hands to a compiled kernel's launcher, on the real kernels. The GPU
test runs the direct path for real against Triton's own launch.
"""

import pytest
import torch

from fastllm.kernels import launch as L
from fastllm.kernels.nf4 import _nf4_dequant_fwd_kernel
from fastllm.kernels.rms_norm import _rms_norm_bwd_kernel, _rms_norm_fwd_kernel


def test_key_is_at_least_as_fine_as_tritons_specialization():
    buf = torch.empty(64, dtype=torch.float32)
    aligned, misaligned = buf[:8], buf[1:9]  # data_ptr % 16: 0 and 4
    key = L.specialization_key
    assert key((aligned,), {}) != key((misaligned,), {})
    assert key((aligned,), {}) != key((aligned.to(torch.bfloat16),), {})
    assert key((aligned,), {}) == key((buf[4:12],), {})  # another aligned fp32 tensor: the same kernel
    # ints: value 1, divisibility by 16 and the 32-bit range are what Triton specializes on
    assert len({key((n,), {}) for n in (1, 16, 17, 2**31, -5)}) == 5
    assert key((32,), {}) == key((48,), {}) and key((3,), {}) == key((5,), {})
    assert key((1.0,), {}) == key((2.5,), {})  # floats: fp32, any value
    assert key((), {"BLOCK": 64}) != key((), {"BLOCK": 128})
    assert key((), {"num_warps": 4}) != key((), {"num_warps": 8})
    assert key((True,), {}) != key((False,), {}) and key((None,), {}) != key((0,), {})


def test_full_args_follow_each_kernels_signature():
    x = torch.empty(4, 8)
    args = (x, x, x, x, 8, 8, 8, 1e-6)
    full = L._full_args(_rms_norm_fwd_kernel, args, {"BLOCK": 8, "num_warps": 4})
    assert full == (*args, 8)  # num_warps is a launch option, not a parameter
    assert L._full_args(_rms_norm_fwd_kernel, args, {"num_warps": 4}) is None  # BLOCK missing
    meta = {"HAS_DW": True, "BLOCK": 8, "ROWS_PER_PROG": 2, "num_warps": 4}
    full = L._full_args(_rms_norm_bwd_kernel, (x,) * 6 + (8, 8, 8, 4, 8), meta)
    assert full[-3:] == (2, 8, True)  # in the kernel's order, not the caller's
    names = _nf4_dequant_fwd_kernel.arg_names
    assert names[-5:] == ["BLOCKSIZE", "BLOCKSIZE2", "NESTED", "ROWS", "COLS"]


@pytest.mark.gpu
def test_gpu_direct_launch_matches_tritons_own():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fastllm.kernels.rms_norm import rms_norm_fwd

    x = torch.randn(37, 300, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(300, device="cuda", dtype=torch.bfloat16) + 0.5
    L.enable(False)
    try:
        want, want_rstd = rms_norm_fwd(x, w, 1e-6)
    finally:
        L.enable(True)
    before = L.STATS["direct"]
    for _ in range(3):  # the first call of a specialization may go through Triton, later ones directly
        got, rstd = rms_norm_fwd(x, w, 1e-6)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(rstd, want_rstd, rtol=0, atol=0)
    assert L.STATS["direct"] >= before + 2, dict(L.STATS)
    assert not [k for k in L.STATS if k.startswith("fallback")], dict(L.STATS)
