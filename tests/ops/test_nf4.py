"""fastllm.ops.nf4: dequantize_nf4 backends, nf4_linear forward/backward, workspace, torch.compile.

bitsandbytes' CPU ``dequantize_4bit`` is a reference at blocksize 64 on shapes where it is right
(see tests/kernels/test_nf4_dequant.py for its CPU trap); other blocksizes use a float64 decode.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

from fastllm.ops import nf4 as nf4_ops  # noqa: E402
from fastllm.ops.nf4 import dequantize_nf4, nf4_args, nf4_linear, nf4_linear_args  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def quantized_param(shape, blocksize=64, nested=True, dtype=torch.float32, device="cpu"):
    """A real bnb Params4bit quantized from a random (N, K) weight."""
    w = torch.randn(shape, dtype=torch.float32).to(dtype)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=blocksize,
                          compress_statistics=nested)
    return p.to(device)


def reference_f64(packed, qs):
    n = qs.shape.numel()
    q = packed.reshape(-1).view(torch.uint8).long()
    nib = torch.stack((q >> 4, q & 15), dim=-1).reshape(-1)[:n]
    absmax = qs.absmax.double()
    if qs.nested:
        a2 = qs.state2.absmax.double().repeat_interleave(qs.state2.blocksize)[: qs.absmax.numel()]
        absmax = qs.state2.code.double()[qs.absmax.long()] * a2 + qs.offset.double()
    return (qs.code.double()[nib] * absmax.repeat_interleave(qs.blocksize)[:n]).reshape(qs.shape)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (333, 77), (64, 256)])
def test_torch_backend_bit_equal_to_bitsandbytes(shape, dtype, nested):
    w = quantized_param(shape, 64, nested, dtype)
    got = dequantize_nf4(w, w.quant_state, backend="torch")
    torch.testing.assert_close(got, F.dequantize_4bit(w, w.quant_state), rtol=0, atol=0)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [32, 128, 256, 512, 1024, 2048, 4096])
def test_torch_backend_every_blocksize(blocksize, nested):
    w = quantized_param((41, 97), blocksize, nested)
    want = reference_f64(w, w.quant_state)
    torch.testing.assert_close(dequantize_nf4(w, w.quant_state, backend="torch").double(), want,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_triton_backend_matches_torch_backend(blocksize, nested):
    w = quantized_param((33, 71), blocksize, nested)
    for dtype in DTYPES:
        out = torch.empty(33, 71, dtype=dtype)
        got = dequantize_nf4(w, w.quant_state, out=out, backend="triton")
        assert got is out
        want = dequantize_nf4(w, w.quant_state, out=torch.empty_like(out), backend="torch")
        exact = {"rtol": 0, "atol": 0}
        torch.testing.assert_close(got, want, **({} if dtype == torch.bfloat16 else exact))


def test_default_dtype_and_errors(monkeypatch):
    w = quantized_param((8, 64), dtype=torch.bfloat16)
    got = dequantize_nf4(w, w.quant_state)
    assert got.dtype == torch.bfloat16 and got.shape == (8, 64)
    with pytest.raises(ValueError, match="shape"):
        dequantize_nf4(w, w.quant_state, out=torch.empty(64, 8))
    with pytest.raises(ValueError, match="backend"):
        dequantize_nf4(w, w.quant_state, backend="cuda")
    fp4 = bnb.nn.Params4bit(torch.randn(8, 64), requires_grad=False, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="nf4"):
        dequantize_nf4(fp4, fp4.quant_state)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            dequantize_nf4(w, w.quant_state, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_fwd_bwd_matches_dense(dtype, backend):
    w = quantized_param((48, 96), 64, True)
    bias = torch.randn(48, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 5, 96, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 5, 48, dtype=dtype)

    y = nf4_linear(x, w, bias, backend=backend)
    dx, db = torch.autograd.grad(y, (x, bias), dy)

    # Same backend for the dense reference: the interpreter's bf16 cast can differ by one ulp.
    dense = dequantize_nf4(w, w.quant_state, out=torch.empty(48, 96, dtype=dtype), backend=backend)
    y_ref = torch.nn.functional.linear(x, dense, bias)
    dx_ref, db_ref = torch.autograd.grad(y_ref, (x, bias), dy)
    tols = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert y.dtype == dtype and y.shape == (2, 5, 48)
    torch.testing.assert_close(y, y_ref, **tols)
    torch.testing.assert_close(dx, dx_ref, **tols)
    torch.testing.assert_close(db, db_ref, **tols)
    assert w.grad is None


def test_nf4_linear_saves_only_packed_weight_and_reuses_workspace():
    w = quantized_param((64, 128), 64, True)
    x = torch.randn(3, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = nf4_linear(x, w)
    assert saved and all(t.dtype == torch.uint8 and t.numel() == 64 * 128 // 2 for t in saved)
    ws = nf4_ops._workspace(x.device, x.dtype, (64, 128))
    ptr = ws.data_ptr()
    y.sum().backward()
    nf4_linear(x, w)
    assert nf4_ops._workspace(x.device, x.dtype, (64, 128)).data_ptr() == ptr
    assert nf4_ops._workspace(x.device, x.dtype, (8, 16)).data_ptr() == ptr  # smaller shapes share it


def test_torch_compile_has_no_graph_break():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    w = quantized_param((24, 64), 64, True)
    bias = torch.randn(24, requires_grad=True)

    def f(x):
        h = nf4_linear(x, w, bias)
        return (h.square().sum() + dequantize_nf4(w, w.quant_state).sum()).float()

    x = torch.randn(4, 64, requires_grad=True)
    loss = torch.compile(f, backend="inductor", fullgraph=True)(x)
    dx, db = torch.autograd.grad(loss, (x, bias))
    loss_ref = f(x)
    dx_ref, db_ref = torch.autograd.grad(loss_ref, (x, bias))
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(db, db_ref)


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_linear_args_equals_nf4_linear_and_traces_plain_tensors(nested):
    """The compiled path's entry: NF4Args of plain tensors, bit-equal to nf4_linear, one graph under fullgraph."""
    from torch._dynamo.utils import counters

    w = quantized_param((40, 128), 64, nested)
    args = nf4_args(w.data, w.quant_state)
    assert type(args.packed) is torch.Tensor and args.shape == (40, 128) and args.blocksize == 64
    assert all(type(t) is torch.Tensor for t in args[1:6] if t is not None)
    bias = torch.randn(40, requires_grad=True)
    x = torch.randn(3, 7, 128, requires_grad=True)
    y, y_ref = nf4_linear_args(x, args, bias), nf4_linear(x, w, bias)
    grads, grads_ref = torch.autograd.grad(y.sum(), (x, bias)), torch.autograd.grad(y_ref.sum(), (x, bias))
    assert torch.equal(y, y_ref) and all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    torch._dynamo.reset()
    counters.clear()
    y_c = torch.compile(nf4_linear_args, backend="aot_eager", fullgraph=True)(x, args, bias)
    torch.testing.assert_close(y_c, y_ref)
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_custom_op_schema():
    for op in (torch.ops.fastllm.nf4_dequantize, torch.ops.fastllm.nf4_linear, torch.ops.fastllm.nf4_linear_backward):
        assert op.default._schema.name.startswith("fastllm::")
    w = quantized_param((8, 64), 64, False)
    args = nf4_ops.state_args(w.quant_state)
    torch.library.opcheck(torch.ops.fastllm.nf4_dequantize.default, (w, *args, torch.float32))


def test_nf4_linear_op_passes_torch_library_checks_with_grad():
    """The ops are registered through ``torch.library.Library`` with a hand-written autograd kernel: opcheck
    runs schema, fake-tensor, autograd-registration and AOT-dispatch checks on it, with x and bias needing grad."""
    w = quantized_param((24, 64), 64, True)
    absmax, code, code2, absmax2, offset, bs, bs2, shape = nf4_ops.state_args(w.quant_state)
    x = torch.randn(3, 64, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    args = (x, w.data, absmax, code, code2, absmax2, offset, bias, bs, bs2, shape)
    torch.library.opcheck(torch.ops.fastllm.nf4_linear.default, args)
    dy = torch.randn(3, 24)
    torch.library.opcheck(torch.ops.fastllm.nf4_linear_backward.default,
                          (dy, w.data, absmax, code, code2, absmax2, offset, bs, bs2, shape))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_nf4_linear_matches_bitsandbytes(dtype):
    w = quantized_param((1024, 4096), 64, True, device="cuda")
    x = torch.randn(4, 256, 4096, dtype=dtype, device="cuda", requires_grad=True)
    dy = torch.randn(4, 256, 1024, dtype=dtype, device="cuda")
    y = nf4_linear(x, w)
    (dx,) = torch.autograd.grad(y, x, dy)
    y_ref = bnb.matmul_4bit(x, w.t(), quant_state=w.quant_state)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx, dx_ref, rtol=2e-2, atol=2e-2)
    dense = F.dequantize_4bit(w, w.quant_state).to(dtype)
    assert torch.equal(dequantize_nf4(w, w.quant_state, out=torch.empty_like(dense)), dense)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_one_token_op_call_goes_to_bitsandbytes(monkeypatch, nested, with_bias):
    """A decode step through the custom op (what compiled regions call) takes bnb's fused 4-bit kernel (its
    ``gemm_4bit`` op, as bnb's own no-grad ``matmul_4bit`` does), eagerly and inside ``torch.compile``, and
    matches bnb's output; two tokens take the dequant + GEMM path."""
    calls = []
    real = nf4_ops._bnb_gemm_op()
    assert real is not None
    monkeypatch.setattr(nf4_ops, "_BNB_GEMM", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = quantized_param((1024, 4096), 64, nested, device="cuda")
    bias = torch.randn(1024, dtype=torch.bfloat16, device="cuda") if with_bias else None
    args = nf4_args(w.data, w.quant_state)
    x = torch.randn(1, 1, 4096, dtype=torch.bfloat16, device="cuda")

    def rel_err(a, b):  # outputs are ~64 in size: compare by norm (bf16 rounding differs per element)
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    with torch.no_grad():
        ref = bnb.matmul_4bit(x, w.t(), quant_state=w.quant_state, bias=bias)
        assert rel_err(nf4_linear_args(x, args, bias), ref) < 1e-3
        assert len(calls) == 1
        torch._dynamo.reset()
        compiled = torch.compile(nf4_linear_args, fullgraph=True)
        assert rel_err(compiled(x, args, bias), ref) < 1e-3
        assert len(calls) == 2
        if bias is not None:  # a bias in another dtype is cast as on the dequant path (bnb wants x's dtype)
            assert rel_err(nf4_linear_args(x, args, bias.float()), ref) < 1e-3
            calls.pop()
        x2 = torch.randn(1, 2, 4096, dtype=torch.bfloat16, device="cuda")
        assert rel_err(nf4_linear_args(x2, args, bias),
                       bnb.matmul_4bit(x2, w.t(), quant_state=w.quant_state, bias=bias)) < 1e-2
        assert len(calls) == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("nested", [True, False])
def test_traced_decode_step_puts_bnb_op_in_the_graph(monkeypatch, nested):
    """Inside compiled code a decode step calls bnb's own ``gemm_4bit`` op in the graph (no fastllm custom op at
    run time): it traces with ``fullgraph`` through bnb's fake implementation and gives bnb's numbers. The device
    condition (CUDA, where bnb's GEMV pays) is lifted here so the CPU runs the traced path with bnb's CPU op."""
    monkeypatch.setattr(nf4_ops, "_goes_to_bnb_gemm", lambda x, packed, code2, bs, bs2, shape: (
        x.numel() == x.shape[-1] and nf4_ops.bnb_gemv_ok(packed, code2, bs, bs2, shape)))
    w = quantized_param((96, 128), 64, nested)
    args = nf4_args(w.data, w.quant_state)
    bias = torch.randn(96)
    x = torch.randn(1, 1, 128)
    fastllm_ops = []
    real_op = nf4_ops._nf4_linear_op
    monkeypatch.setattr(nf4_ops, "_nf4_linear_op", lambda *a: fastllm_ops.append(1) or real_op(*a))
    absmax, code, code2, absmax2, offset, bs, _, shape = nf4_ops.state_args(w.quant_state)
    ref = nf4_ops.bnb_gemv(x, w.data, absmax, code, code2, absmax2, offset, bias, bs, shape)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(nf4_linear_args, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, args, bias), ref, rtol=0, atol=0)
        assert fastllm_ops == []  # bnb's op, not fastllm's, is in the graph
        with torch.enable_grad():  # grad mode on: fastllm's op (bnb's has no autograd formula)
            xg = x.clone().requires_grad_()
            y = compiled(xg, args, bias)
            assert y.requires_grad and fastllm_ops
            torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_workspace_views_are_reused_and_dropped_when_the_buffer_grows():
    dev = torch.device("cpu")
    nf4_ops.clear_workspaces()
    a = nf4_ops._workspace(dev, torch.float32, [4, 8])
    assert nf4_ops._workspace(dev, torch.float32, (4, 8)) is a  # one dict lookup on the hot path
    b = nf4_ops._workspace(dev, torch.float32, (8, 4))
    assert b.data_ptr() == a.data_ptr() and b.shape == (8, 4)
    big = nf4_ops._workspace(dev, torch.float32, (16, 16))  # grows: the old views go with the old buffer
    again = nf4_ops._workspace(dev, torch.float32, (4, 8))
    assert again is not a and again.data_ptr() == big.data_ptr()
    assert len(nf4_ops._WORKSPACES) == 1
    nf4_ops.clear_workspaces()
    assert not nf4_ops._VIEWS and not nf4_ops._WORKSPACES


def test_workspace_epoch_moves_on_growth_and_clear_only():
    """What decode graphs key on: the epoch changes exactly when a buffer a graph may have captured is replaced or
    dropped; ``workspace_buffers`` names the buffers in use (what a graph holds)."""
    dev = torch.device("cpu")
    nf4_ops.clear_workspaces()
    e0 = nf4_ops.workspace_epoch()
    assert nf4_ops.workspace_buffers() == ()
    a = nf4_ops._workspace(dev, torch.float32, (4, 8))  # first buffer
    e1 = nf4_ops.workspace_epoch()
    assert e1 > e0 and [b.data_ptr() for b in nf4_ops.workspace_buffers()] == [a.data_ptr()]
    nf4_ops._workspace(dev, torch.float32, (2, 8))  # fits: same buffer, same epoch
    nf4_ops._workspace(dev, torch.float32, (8, 4))
    assert nf4_ops.workspace_epoch() == e1
    nf4_ops._workspace(dev, torch.float32, (16, 16))  # grows
    e2 = nf4_ops.workspace_epoch()
    assert e2 > e1
    nf4_ops.clear_workspaces()
    assert nf4_ops.workspace_epoch() > e2 and nf4_ops.workspace_buffers() == ()
