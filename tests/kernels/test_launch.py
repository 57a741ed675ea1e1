"""``kernels.launch``: the direct launch path names the binary Triton would pick, and computes the same."""

import pytest
import torch

from fastllm.kernels import launch as L
from fastllm.kernels.swiglu import _BLOCK, _swiglu_fwd_kernel


def test_traits_separate_what_triton_specialises_on():
    x = torch.zeros(64)
    assert L._trait(x) == (torch.float32, True)
    assert L._trait(x[1:]) == (torch.float32, False)  # a 4-byte offset: not 16-byte aligned
    assert L._trait(x.half()) != L._trait(x)
    assert L._trait(1) != L._trait(3)              # 1 becomes a constant in Triton
    assert L._trait(32) != L._trait(33)            # divisibility by 16
    assert L._trait(2 ** 31) != L._trait(16)       # 64-bit ints
    assert L._trait(16) == L._trait(4096)          # the same binary serves both
    assert L._trait(True) != L._trait(1)
    assert L._trait(0.5) == L._trait(2.0)          # floats are not specialised
    assert L._trait(None) is None


def _swiglu(g, u):
    h = torch.empty_like(g)
    n = g.numel()
    L.launch(_swiglu_fwd_kernel, ((n + _BLOCK - 1) // _BLOCK,), g, u, h, n, BLOCK=_BLOCK, num_warps=4)
    return h


def test_launch_computes_what_the_kernel_computes():
    """On the CPU this runs through the interpreter (the direct path is off there); on a GPU, see below."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g, u = torch.randn(2, 1000, device=dev), torch.randn(2, 1000, device=dev)
    torch.testing.assert_close(_swiglu(g, u), torch.nn.functional.silu(g) * u)


@pytest.mark.gpu
def test_direct_launches_follow_alignment_and_sizes(monkeypatch):
    """Aligned, misaligned and differently sized inputs, each twice: the second call of each takes the
    direct path, and every result equals the eager maths (a wrong binary would read misaligned vectors)."""
    base = torch.randn(4 * 4099 + 8, device="cuda")
    cases = [(base[:4096], base[4096:8192]), (base[1:4100], base[4101:8200]), (base[:4099], base[4100:8199]),
             (base[:1], base[4:5])]
    before = L.launch_stats()
    for g, u in cases * 2:
        torch.testing.assert_close(_swiglu(g, u), torch.nn.functional.silu(g) * u)
    after = L.launch_stats()
    assert after["fast"] - before["fast"] >= len(cases)
    monkeypatch.setenv("FASTLLM_FAST_LAUNCH", "0")  # the switch back to Triton's own path
    L.set_enabled(None)
    try:
        g, u = cases[1]
        torch.testing.assert_close(_swiglu(g, u), torch.nn.functional.silu(g) * u)
        assert L.launch_stats()["fast"] == after["fast"]
    finally:
        monkeypatch.delenv("FASTLLM_FAST_LAUNCH")
        L.set_enabled(None)


def test_host_grid_maths_match_triton():
    import triton

    assert all(L.next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert all(L.cdiv(a, b) == triton.cdiv(a, b) for a in range(1, 300) for b in range(1, 70))


def test_direct_path_needs_triton_3_3(monkeypatch):
    """Older launchers take the runtime arguments only: the direct path stays off there."""
    import triton

    monkeypatch.setattr(triton, "__version__", "3.2.0")
    assert not L._triton_at_least(3, 3)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert L._triton_at_least(3, 3)
