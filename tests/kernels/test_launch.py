"""``kernels.launch``: the direct launch path names the binary Triton would pick, and computes the same."""

import logging
import types

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
    L.launch(_swiglu_fwd_kernel, ((n + _BLOCK - 1) // _BLOCK,), g, u, h, n, BLOCK=_BLOCK, GELU=False, num_warps=4)
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
    import triton

    if L._read_kind() is not None:  # a Triton whose launcher was read: every first launch passed its check
        assert after["fast"] - before["fast"] >= len(cases) and after["refused"] == before["refused"]
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


@pytest.mark.gpu
def test_launch_on_cuda0_with_the_guard_taken(monkeypatch):
    """One GPU: the guard's switch to the tensors' device (here to cuda:0 while another device is said to be current)
    and no switch when the tensors are on the current device; the results equal the eager maths either way."""
    g, u = torch.randn(3000, device="cuda:0"), torch.randn(3000, device="cuda:0")
    before = L.launch_stats()
    with torch.cuda.device(0):
        for _ in range(3):  # checked first launch, then the direct path
            torch.testing.assert_close(_swiglu(g, u), torch.nn.functional.silu(g) * u)
    assert L.launch_stats()["guarded"] == before["guarded"]
    real = L._current_device
    monkeypatch.setattr(L, "_current_device", lambda: real() + 1)  # "another device is current"
    for _ in range(3):
        torch.testing.assert_close(_swiglu(g, u), torch.nn.functional.silu(g) * u)
    assert L.launch_stats()["guarded"] - before["guarded"] == 3
    assert torch.cuda.current_device() == 0


@pytest.mark.multigpu
def test_tensors_on_cuda1_with_device_0_current():
    """A model on cuda:1 while device 0 is current: Triton launches on the current device, so without the guard this
    fails ("Pointer argument cannot be accessed from Triton"). Through ``launch`` and through the NF4 dequant op."""
    import bitsandbytes.functional as F

    from fastllm.ops import dequantize_nf4

    torch.cuda.set_device(0)
    g, u = torch.randn(3000, device="cuda:1"), torch.randn(3000, device="cuda:1")
    before = L.launch_stats()
    for _ in range(3):
        torch.testing.assert_close(_swiglu(g, u), torch.nn.functional.silu(g) * u)
    assert L.launch_stats()["guarded"] - before["guarded"] == 3 and torch.cuda.current_device() == 0
    w = torch.randn(256, 192, dtype=torch.bfloat16, device="cuda:1")
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    for _ in range(2):
        got = dequantize_nf4(packed, qs, backend="triton")
        assert got.device == torch.device("cuda:1")
        torch.testing.assert_close(got, F.dequantize_4bit(packed, qs), rtol=0, atol=0)
    assert torch.cuda.current_device() == 0


def test_host_grid_maths_match_triton():
    import triton

    assert all(L.next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert all(L.cdiv(a, b) == triton.cdiv(a, b) for a in range(1, 300) for b in range(1, 70))


@pytest.mark.parametrize("version, kind", [
    ("3.6.0", "c"), ("3.6.1+git8a1b2c3", "c"), ("3.9.0", "run"), ("3.9.1rc2", "run"),
    ("3.2.0", None), ("3.5.1", None), ("3.7.0", None), ("3.8.0", None), ("3.10.0", None), ("4.0.0", None),
    ("main", None),
])
def test_direct_path_only_for_triton_versions_whose_launcher_was_read(monkeypatch, version, kind):
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    assert L._read_kind() == kind
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FASTLLM_FAST_LAUNCH", raising=False)
    L.set_enabled(None)
    try:
        assert L._enabled() is (kind is not None) and L._KIND == kind
        monkeypatch.setenv("FASTLLM_FAST_LAUNCH", "0")
        L.set_enabled(None)
        assert not L._enabled()
    finally:
        L.set_enabled(None)  # read again (the interpreter's setting) at the next launch


# ---- the first-launch check and the device guard, on fakes of Triton's objects -------------------------------

class _OnDevice(torch.Tensor):
    """A CPU tensor that says it lives on CUDA device ``index`` (what the guard reads)."""

    index = 0

    def get_device(self):
        return type(self).index


class _Launcher:
    """Triton 3.9's ``CudaLauncher.__call__`` signature: records each launch."""

    def __init__(self, log):
        self.log = log

    def __call__(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *params):
        self.log.append(((gx, gy, gz), stream, function, metadata, params))


class _Compiled:
    """``CompiledKernel`` as read: ``run`` is a property that loads the launcher into ``_run`` on first use."""

    def __init__(self, log):
        self._run, self.log, self.function, self.packed_metadata = None, log, 1234, (4, 1, 0)

    @property
    def run(self):
        if self._run is None:
            self._run = _Launcher(self.log)
        return self._run


class _Chain:
    """``triton.knobs.HookChain``: what Triton passes as a launch hook, empty unless a profiler added one."""

    def __init__(self, *calls):
        self.calls = list(calls)


class _Kernel:
    """``JITFunction`` as read (runtime/jit.py ``run``): bind the parameters with their defaults, find the compiled
    kernel, call ``kernel.run(grid, stream, function, packed_metadata, launch_metadata, knobs' launch hook chains,
    *params)``.
    ``change`` makes it differ from the direct path the way another Triton could."""

    def __init__(self, change=None):
        self.params = [types.SimpleNamespace(name=n, default=d) for n, d in (("x", None), ("n", None), ("B", 64))]
        self.log, self.calls, self.change = [], 0, change
        self.compiled = _Compiled(self.log)

    def warmup(self, *args, grid, **kwargs):
        return _Compiled(self.log) if self.change == "another binary" else self.compiled

    def __getitem__(self, grid):
        def go(*args, **kwargs):
            self.calls += 1
            names = [p.name for p in self.params]
            params = [*args, *(kwargs.get(n, p.default) for n, p in zip(names[len(args):], self.params[len(args):]))]
            g = (*grid, 1, 1)[:3]
            hook = _Chain(lambda *a: None) if self.change == "hook" else _Chain()
            launch_metadata = object()  # Triton's LazyDict (it builds one whenever the hook chain is not None)
            extra = ("scratch",) if self.change == "extra argument" else ()
            c, stream = self.compiled, L._raw_stream(L._current_device())  # the current device's stream
            c.run(*g, stream, c.function, c.packed_metadata, launch_metadata, hook, _Chain(), *params, *extra)
            return c

        return go


@pytest.fixture
def fake_cuda(monkeypatch):
    """The direct path on, as on Triton 3.9 with a GPU, over fresh caches; CUDA's device and stream calls faked."""
    import triton

    monkeypatch.setattr(triton, "__version__", "3.9.0")
    for name, value in (("_CACHE", {}), ("_SLOW", set()), ("_WARNED", False), ("_current_device", lambda: 0),
                        ("_raw_stream", lambda device: 70 + device)):
        monkeypatch.setattr(L, name, value)
    L.set_enabled(True)
    yield
    L.set_enabled(None)


def _x():
    return torch.zeros(4).as_subclass(_OnDevice)


def test_first_launch_is_checked_then_direct(fake_cuda):
    k, x = _Kernel(), _x()
    before = L.launch_stats()
    for _ in range(3):
        L.launch(k, (5,), x, 16)
    after = L.launch_stats()
    assert k.calls == 1  # only the first through kernel[grid]
    assert after["slow"] - before["slow"] == 1 and after["fast"] - before["fast"] == 2
    assert after["refused"] == before["refused"]
    # Each launch: the grid padded to 3, the device's stream, the binary, every parameter (the constexpr's default)
    assert k.log == [((5, 1, 1), 70, 1234, (4, 1, 0), (x, 16, 64))] * 3


@pytest.mark.parametrize("change", ["extra argument", "hook", "another binary"])
def test_a_launch_that_differs_from_tritons_keeps_kernel_grid(fake_cuda, caplog, change):
    k, x = _Kernel(change), _x()
    before = L.launch_stats()
    with caplog.at_level(logging.WARNING, logger="fastllm"):
        for _ in range(3):
            L.launch(k, (5,), x, 16, B=32)
        L.launch(_Kernel(change), (5,), x, 16)  # another refused kernel: not logged again
    after = L.launch_stats()
    assert k.calls == 3 and after["fast"] == before["fast"] and after["refused"] - before["refused"] == 2
    assert len(k.log) == 3 and all(entry[4][:3] == (x, 16, 32) for entry in k.log)  # launched once per call
    warnings = [r for r in caplog.records if "direct launch" in r.getMessage()]
    assert len(warnings) == 1 and "kernel[grid]" in warnings[0].getMessage()


def test_launch_switches_to_the_tensors_device(fake_cuda, monkeypatch):
    """Triton launches on the current device: a tensor on another one is launched under ``torch.cuda.device``."""
    switched = []

    class _Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            switched.append(self.index)
            L._current_device = lambda: self.index  # noqa: B023 - what torch.cuda.device does

        def __exit__(self, *exc):
            L._current_device = lambda: 0

    monkeypatch.setattr(torch.cuda, "device", _Device)
    monkeypatch.setattr(_OnDevice, "index", 1)
    k, x = _Kernel(), _x()
    before = L.launch_stats()
    for _ in range(2):
        L.launch(k, (5,), x, 16)
    assert switched == [1, 1] and L.launch_stats()["guarded"] - before["guarded"] == 2
    assert [entry[1] for entry in k.log] == [71, 71]  # device 1's stream, checked then direct
    assert L.launch_stats()["fast"] - before["fast"] == 1
    monkeypatch.setattr(_OnDevice, "index", 0)  # on the current device: no switch
    L.launch(k, (5,), _x(), 16)
    assert switched == [1, 1]
