"""``kernels.launch``: the direct launch path names the binary Triton would pick, and computes the same."""

import pytest
import torch

from fastllm.kernels import launch as L
from fastllm.kernels.swiglu import _BLOCK, _swiglu_fwd_kernel


def _t(a):
    return L._traits((a,))


def test_traits_separate_what_triton_specialises_on():
    x = torch.zeros(64)
    assert _t(x) == (torch.float32, True)
    assert _t(x[1:]) == (torch.float32, False)  # a 4-byte offset: not 16-byte aligned
    assert _t(x.half()) != _t(x)
    assert _t(torch.nn.Parameter(x)) == _t(x)  # subclasses as tensors
    assert _t(1) != _t(3)              # 1 becomes a constant in Triton
    assert _t(32) != _t(33)            # divisibility by 16
    assert _t(2 ** 31) != _t(16)       # 64-bit ints
    assert _t(2 ** 32) != _t(2 ** 63)  # signed and unsigned 64-bit
    assert _t(16) == _t(4096)          # the same binary serves both
    assert _t(True) != _t(1)
    assert _t(0.5) == _t(2.0)          # floats are not specialised
    assert _t(None) == (None,)
    # flat keys stay unambiguous when an optional tensor is None in one call and set in another
    assert L._traits((None, x, 16)) != L._traits((x, None, 16))
    assert L._traits((x, 1)) != L._traits((1, x))


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
    import triton

    if triton.__version__.startswith("3.6."):  # the version whose C launcher signature is known: called directly
        assert all(hit[1] is not None for k, hit in L._CACHE.items() if k[0] == id(_swiglu_fwd_kernel))
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
