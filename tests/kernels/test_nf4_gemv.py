"""The decode NF4 GEMV (``fastllm.kernels.nf4_gemv`` through ``fastllm.ops.nf4_gemv``) against ``F.linear`` on the
dequantized weight, with and without the LoRA term and bias, nested or not, odd shapes and several blocksizes; the
gate/up kernel against SiLU / GELU-tanh of the two. On the CPU the kernels run through the Triton interpreter
(fp32 and fp16: the interpreter mishandles bf16 arithmetic), and the torch fallback is checked the same way."""

import pytest
import torch
import torch.nn.functional as F

bnb = pytest.importorskip("bitsandbytes")

from fastllm.ops.nf4 import dequantize_nf4, plain_tensor, state_args  # noqa: E402
from fastllm.ops.nf4_gemv import gemv_ok, nf4_gemv, nf4_glu_gemv  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
BACKENDS = ["triton", "torch"]


def quantized(n, k, blocksize, nested):
    w = torch.randn(n, k, device=DEVICE) * 0.05
    packed, qs = bnb.functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    state = state_args(qs)
    # the dense weight from fastllm's torch decode (bnb's CPU dequant is wrong for some blocksizes: FACTS.md);
    # tests/kernels/test_nf4_dequant.py ties that decode to bitsandbytes
    dense = dequantize_nf4(packed, qs, backend="torch").float()
    return plain_tensor(packed), state, dense


def reference(x, dense, bias=None, lora=None):
    """PEFT's roundings on the dense weight: base (fp32 accumulate, rounded), product, scaled product, sum."""
    dt = x.dtype
    y = (x.float() @ dense.to(dt).float().T + (0 if bias is None else bias.float())).to(dt)
    if lora is None:
        return y
    xa, b, s = lora
    t = (xa.float() @ b.float().T).to(dt)
    t = (t.float() * s).to(dt)
    return (y.float() + t.float()).to(dt)


def tol(dtype, k):
    # fp32: summation order only; half types: a base rounding apart (one ulp) where the fp32 sums straddle a tie
    return {torch.float32: dict(rtol=1e-5, atol=1e-5 * k ** 0.5), torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]


def lora_args(m, n, r, dtype, s=0.5):
    a = torch.randn(m, r + 3, device=DEVICE, dtype=dtype)[:, 1:r + 1]  # a column slice, as lora_decode's split gives
    return a, (torch.randn(n, r, device=DEVICE) * 0.1).to(dtype), s


SHAPES = [  # (M, N, K, blocksize)
    (1, 123, 64, 64), (3, 77, 192, 64), (17, 40, 1024, 64), (5, 33, 96, 32), (2, 50, 384, 128), (64, 24, 768, 256),
    (1, 16, 4096, 4096)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_linear_on_dequantized_weight(shape, nested, dtype, backend):
    m, n, k, bs = shape
    packed, state, dense = quantized(n, k, bs, nested)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if m % 2 else None
    torch.testing.assert_close(nf4_gemv(x, packed, state, bias, backend=backend), reference(x, dense, bias),
                               **tol(dtype, k))
    lora = lora_args(m, n, 5 if n % 2 else 16, dtype)
    torch.testing.assert_close(nf4_gemv(x, packed, state, bias, lora, backend=backend),
                               reference(x, dense, bias, lora), **tol(dtype, k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 45, 128, 64), (6, 19, 192, 64), (33, 64, 512, 128)])
def test_glu_gemv_matches_act_of_two_linears(shape, dtype, gelu, backend):
    m, n, k, bs = shape
    nested = m % 2 == 0
    (pg, sg, dg), (pu, su, du) = quantized(n, k, bs, nested), quantized(n, k, bs, nested)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    for lg, lu in ((None, None), (lora_args(m, n, 8, dtype, 2.0), lora_args(m, n, 8, dtype, 2.0))):
        if lg is not None:  # gate's and up's xa: two column slices of one buffer, as the decode group computes them
            xa = torch.randn(m, 16, device=DEVICE).to(dtype)
            lg, lu = (xa[:, :8], lg[1], lg[2]), (xa[:, 8:], lu[1], lu[2])
        g, u = reference(x, dg, None, lg), reference(x, du, None, lu)
        want = (F.gelu(g, approximate="tanh") if gelu else F.silu(g)) * u
        got = nf4_glu_gemv(x, (pg, sg, lg), (pu, su, lu), gelu=gelu, backend=backend)
        t = tol(dtype, k)
        torch.testing.assert_close(got, want, rtol=t["rtol"] * 2, atol=t["atol"] * 2)


def test_gemv_limits():
    packed, state, _ = quantized(8, 96, 32, False)
    assert gemv_ok(state, 1) and gemv_ok(state, 64)
    assert not gemv_ok(state, 65) and not gemv_ok(state, 0)
    odd = state[:7] + ([8, 80],)  # in_features not a multiple of the blocksize
    assert not gemv_ok(odd, 1)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        nf4_gemv(torch.randn(65, 96, device=DEVICE), packed, state, backend="triton")


def test_decode_steps_take_it_unless_switched_off(monkeypatch):
    from fastllm._compat import triton_available
    from fastllm.ops.nf4_gemv import gemv_enabled, set_enabled

    cuda = torch.device("cuda")
    try:
        monkeypatch.delenv("FASTLLM_NF4_GEMV", raising=False)
        set_enabled(None)
        assert gemv_enabled(cuda) == triton_available()  # on by default where Triton imports
        assert not gemv_enabled(torch.device("cpu"))  # never on the CPU: the torch fallback is no faster there
        monkeypatch.setenv("FASTLLM_NF4_GEMV", "0")
        set_enabled(None)  # the environment is read again
        assert not gemv_enabled(cuda)
        set_enabled(True)
        assert gemv_enabled(cuda) == triton_available()
        set_enabled(False)
        assert not gemv_enabled(cuda)
    finally:
        set_enabled(None)


def test_pair_table_holds_both_values_of_each_byte():
    from fastllm.kernels.nf4_tile import pair_table

    code = state_args(bnb.functional.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="nf4")[1])[1]
    pairs = pair_table(code)
    hi = (pairs >> 32).to(torch.int32).view(torch.float32)
    lo = (pairs & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    b = torch.arange(256)
    torch.testing.assert_close(hi, code.float()[b >> 4], rtol=0, atol=0)
    torch.testing.assert_close(lo, code.float()[b & 15], rtol=0, atol=0)
    assert pair_table(code) is pairs  # made once per code tensor


@pytest.mark.parametrize("top", [1, 8])
def test_gemv_config_picks_the_path_by_rows(top, monkeypatch):
    from fastllm.kernels.nf4_gemv import ROWS_CONFIG, gemv_config

    monkeypatch.setitem(ROWS_CONFIG, "MAX_M", top)  # 1: the CUDA cores' several-row mode off (the default)
    one, few, many = gemv_config(1, 4096, 64), gemv_config(top, 4096, 64), gemv_config(top + 1, 4096, 64)
    assert (one["DOT"], one["BLOCK_M"], one["UNPACK"]) == (True, 16, 5)  # the byte permutes, the row padded to 16
    if top > 1:
        assert (few["DOT"], few["UNPACK"], few["BLOCK_M"]) == (False, 3, next_pow2(top))
    assert gemv_config(1, 4096, 64, {"DOT": False})["BLOCK_M"] == 1
    assert many["DOT"] and many["BLOCK_M"] >= 16
    assert gemv_config(3, 4096, 64, {"DOT": True})["DOT"] and not gemv_config(40, 4096, 64, {"DOT": False})["DOT"]
    lut = gemv_config(1, 4096, 64, {"DOT": True, "UNPACK": 5, "BLOCK_K": 256})  # one row on the tensor cores
    assert (lut["DOT"], lut["BLOCK_M"], lut["BLOCK_K"], lut["CHUNK"], lut["UNPACK"]) == (True, 16, 64, 64, 5)
    assert gemv_config(1, 4096, 64, {"DOT": False, "UNPACK": 5})["UNPACK"] == 0
    split = gemv_config(1, 14336, 64, {"DOT": False, "BLOCK_K": 1024, "STEPS": 3})
    assert (split["SPLIT"], split["KS"]) == (5, 3072)  # 14 steps in ranges of 3: the last range 2 steps
    assert gemv_config(1, 14336, 64, {"DOT": False, "BLOCK_K": 1024, "STEPS": 0})["SPLIT"] == 1


def next_pow2(n):
    return 1 << (n - 1).bit_length()


@pytest.mark.parametrize("m,config", [
    (1, {"DOT": False, "BLOCK_N": 2, "BLOCK_K": 256, "num_warps": 2}),   # one row, 4 quantization blocks a step
    (1, {"DOT": False, "BLOCK_N": 8, "BLOCK_K": 32}),                     # one row, half a block a step
    (5, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 256, "num_stages": 2}),  # tensor cores, 4 blocks a step (3-D scale)
    (5, {"DOT": True, "BLOCK_N": 64, "BLOCK_K": 32}),                    # tensor cores, half a block a step
    (1, {"DOT": False, "BLOCK_N": 4, "BLOCK_K": 256, "UNPACK": 1}),  # a nibble per element: one row, 4 blocks a step
    (1, {"DOT": False, "BLOCK_N": 8, "BLOCK_K": 32, "UNPACK": 1}),        # ... half a block a step
    (5, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 128, "UNPACK": 1}),      # ... tensor cores, 2 blocks a step
    (5, {"DOT": True, "BLOCK_N": 32, "BLOCK_K": 64, "UNPACK": 1}),       # ... tensor cores, one block a step
    (1, {"DOT": False, "BLOCK_N": 4, "BLOCK_K": 256, "UNPACK": 2}),  # a byte's two values from the pair table: 4 blocks
    (1, {"DOT": False, "BLOCK_N": 8, "BLOCK_K": 32, "UNPACK": 2}),        # ... half a block a step
    (5, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 128, "UNPACK": 2}),      # ... tensor cores, 2 blocks a step
    (1, {"DOT": False, "BLOCK_N": 8, "BLOCK_K": 64, "STEPS": 1}),  # split K: 8 ranges of one step, an epilogue launch
    (1, {"DOT": False, "BLOCK_N": 4, "BLOCK_K": 128, "STEPS": 3}),        # ... ranges of 3 steps, the last one short
    (5, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 64, "STEPS": 3}),        # ... tensor cores
    (3, {"DOT": True, "BLOCK_N": 32, "BLOCK_K": 128, "STEPS": 1, "UNPACK": 2}),
    (1, {"DOT": False, "BLOCK_N": 4, "BLOCK_K": 256, "UNPACK": 3}),  # 32-bit words, the next step prefetched: 4 blocks
    (1, {"DOT": False, "BLOCK_N": 8, "BLOCK_K": 32, "UNPACK": 3}),        # ... half a block a step
    (1, {"DOT": False, "BLOCK_N": 2, "BLOCK_K": 128, "UNPACK": 3, "STEPS": 3}),  # ... split K, the last range short
    (5, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 64, "UNPACK": 3}),  # tensor cores: words are one-row only (bytes there)
    (1, {"DOT": False, "BLOCK_N": 4, "BLOCK_K": 256, "UNPACK": 4}),  # bytes summed once after the K loop: 4 blocks
    (1, {"DOT": False, "BLOCK_N": 8, "BLOCK_K": 32, "UNPACK": 4}),        # ... half a block a step
    (1, {"DOT": False, "BLOCK_N": 2, "BLOCK_K": 128, "UNPACK": 4, "STEPS": 3}),  # ... split K, the last range short
    (5, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 64, "UNPACK": 4}),  # tensor cores: lanes are one-row only
    (5, {"DOT": False, "BLOCK_N": 4, "BLOCK_K": 128}),      # several rows on the CUDA cores (words), 2 blocks a step
    (3, {"DOT": False, "BLOCK_N": 8, "BLOCK_K": 32, "STEPS": 3}),  # ... half a block a step, split K
    (8, {"DOT": False, "BLOCK_N": 2, "BLOCK_K": 512, "UNPACK": 0}),  # ... words whatever UNPACK says
    (1, {"DOT": True, "BLOCK_N": 32, "BLOCK_K": 256, "UNPACK": 5}),  # codes rounded to x's dtype, block-scaled dot
    (5, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 64, "UNPACK": 5, "STEPS": 3}),  # ... several rows, split K
    (1, {"DOT": False, "BLOCK_N": 8, "BLOCK_K": 128, "UNPACK": 5}),  # ... a tensor-core mode: bytes on the CUDA cores
])
def test_tile_overrides_keep_the_maths(m, config):
    """The sweep's tile alternatives (``gemv_config`` overrides, the path included) compute the same as the
    defaults."""
    n, k, bs = 37, 512, 64
    packed, state, dense = quantized(n, k, bs, True)
    x = torch.randn(m, k, device=DEVICE).to(torch.float16)
    lora = lora_args(m, n, 8, torch.float16)
    want = reference(x, dense, None, lora)
    torch.testing.assert_close(nf4_gemv(x, packed, state, None, lora, backend="triton", config=config), want,
                               **tol(torch.float16, k))
    pair = nf4_glu_gemv(x, (packed, state, lora), (packed, state, lora), backend="triton", config=config)
    torch.testing.assert_close(pair, F.silu(want) * want, rtol=4e-3, atol=4e-3)


@pytest.mark.parametrize("m,ns,k,blocksize,config", [
    (1, (64, 16, 16), 256, 64, None),                                  # q/k/v: one launch, K split (default)
    (1, (40, 24, 24), 192, 64, {"STEPS": 0}),                          # whole K: no epilogue
    (3, (33, 17), 128, 32, None),                                      # two projections, several rows
    (5, (48, 16, 16), 128, 64, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 64}),  # tensor cores
    (1, (48, 16, 16), 128, 64, {"DOT": True, "BLOCK_N": 16, "UNPACK": 5}),  # one row, block-scaled tensor cores
])
@pytest.mark.parametrize("bias", [False, True])
def test_group_gemv_equals_one_launch_a_projection(m, ns, k, blocksize, config, bias):
    """``nf4_group_gemv`` (q/k/v in one launch) gives each projection what its own ``nf4_gemv`` launch gives (the
    same tile maths: exactly, in the interpreter), LoRA on, biases on or off (Qwen2's q/k/v)."""
    from fastllm.ops.nf4_gemv import nf4_group_gemv

    dtype = torch.float32
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    xa_all = torch.randn(m, 16 * len(ns), device=DEVICE, dtype=dtype)  # one buffer, split per adapter
    items = []
    for i, n in enumerate(ns):
        packed, state, _ = quantized(n, k, blocksize, nested=True)
        b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
        lora = (xa_all[:, 16 * i:16 * (i + 1)], (torch.randn(n, 16, device=DEVICE) * 0.1).to(dtype), 0.5 + i)
        items.append((packed, state, b, lora))
    got = nf4_group_gemv(x, items, backend="triton", config=config)
    assert got is not None and [g.shape for g in got] == [(m, n) for n in ns]
    for (packed, state, b, lora), g in zip(items, got):
        torch.testing.assert_close(g, nf4_gemv(x, packed, state, b, lora, backend="triton", config=config), rtol=0,
                                   atol=0)
    fallback = nf4_group_gemv(x, items, backend="torch")
    for g, f in zip(got, fallback):
        torch.testing.assert_close(g, f, **tol(dtype, k))


@pytest.mark.parametrize("m,config", [
    (1, {"DOT": False, "BLOCK_N": 8, "BLOCK_K": 64, "STEPS": 1}),                      # 8 K ranges of one step
    (1, {"DOT": False, "BLOCK_N": 4, "BLOCK_K": 128, "STEPS": 3}),  # ... of 3 steps, the last one short
    (3, {"DOT": False, "BLOCK_N": 8, "BLOCK_K": 32, "STEPS": 3}),        # several rows on the CUDA cores
    (5, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 64, "STEPS": 3}),        # tensor cores
    (5, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 64, "UNPACK": 5, "STEPS": 3}),  # block-scaled tensor cores
])
def test_last_range_finishes_as_the_epilogue_does(m, config):
    """With ``FINISH`` each output tile's last K range to arrive sums the partials (no epilogue launch): the same
    sums in the same split order as the epilogue's, so the same bits, for one projection (bias and LoRA term), the
    gate/up pair and a q/k/v group; the arrival counters are back at zero after every launch, so a second launch
    (a graph replay) finishes again."""
    from fastllm.kernels import nf4_gemv as kernels
    from fastllm.ops.nf4_gemv import nf4_group_gemv

    n, k, bs = 37, 512, 64
    assert kernels.gemv_config(m, k, bs, {**config, "FINISH": True})["FINISH"]
    assert not kernels.gemv_config(m, k, bs, {**config, "FINISH": True, "STEPS": 0})["FINISH"]  # one range: no split
    packed, state, _ = quantized(n, k, bs, True)
    x = torch.randn(m, k, device=DEVICE).to(torch.float16)
    lora = lora_args(m, n, 8, torch.float16)
    bias = torch.randn(n, device=DEVICE).to(torch.float16)
    finish = {**config, "FINISH": True}
    for _ in range(2):
        torch.testing.assert_close(nf4_gemv(x, packed, state, bias, lora, backend="triton", config=finish),
                                   nf4_gemv(x, packed, state, bias, lora, backend="triton", config=config),
                                   rtol=0, atol=0)
        pair = [nf4_glu_gemv(x, (packed, state, lora), (packed, state, lora), backend="triton", config=c)
                for c in (finish, config)]
        torch.testing.assert_close(pair[0], pair[1], rtol=0, atol=0)
        assert int(kernels._COUNTERS[x.device].abs().sum()) == 0
    xa_all = torch.randn(m, 24, device=DEVICE).to(torch.float16)
    items = [(p, st, None, (xa_all[:, 8 * i:8 * (i + 1)], (torch.randn(nn, 8, device=DEVICE) * 0.1).half(), 0.5))
             for i, (nn, (p, st, _)) in enumerate((nn, quantized(nn, k, bs, True)) for nn in (40, 17, 17))]
    for got, want in zip(nf4_group_gemv(x, items, backend="triton", config=finish),
                         nf4_group_gemv(x, items, backend="triton", config=config)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert int(kernels._COUNTERS[x.device].abs().sum()) == 0


def test_finish_takes_the_epilogue_without_counters(monkeypatch):
    """More output tiles than counters: the launch takes the epilogue (same result), and the counters stay zero."""
    from fastllm.kernels import nf4_gemv as kernels

    packed, state, dense = quantized(40, 256, 64, True)
    x = torch.randn(1, 256, device=DEVICE)
    config = {"BLOCK_N": 4, "BLOCK_K": 64, "STEPS": 1, "FINISH": True}
    monkeypatch.setattr(kernels, "COUNTERS", 4)  # 10 tiles
    assert kernels.tile_counters(x, 10) is None
    torch.testing.assert_close(nf4_gemv(x, packed, state, None, None, backend="triton", config=config),
                               reference(x, dense), **tol(torch.float32, 256))


def test_group_gemv_declines_mixed_projections():
    """A bias or nesting on some projections only: None, so the caller runs them one by one."""
    from fastllm.ops.nf4_gemv import nf4_group_gemv

    x = torch.randn(1, 128, device=DEVICE)
    (p1, s1, _), (p2, s2, _) = quantized(32, 128, 64, True), quantized(16, 128, 64, False)
    assert nf4_group_gemv(x, [(p1, s1, None, None), (p2, s2, None, None)], backend="triton") is None
    (p3, s3, _) = quantized(16, 128, 64, True)
    assert nf4_group_gemv(x, [(p1, s1, torch.zeros(32, device=DEVICE), None), (p3, s3, None, None)],
                          backend="triton") is None


def test_decode_rows_cap_moves_and_refuses_what_the_kernels_cannot_take():
    from fastllm.ops.nf4_gemv import DECODE_ROWS, decode_rows, set_decode_rows

    packed, state, _ = quantized(8, 96, 32, False)
    try:
        set_decode_rows(16)
        assert decode_rows() == 16 and gemv_ok(state, 16, decode_rows()) and not gemv_ok(state, 17, decode_rows())
        with pytest.raises(ValueError, match="1 to 64"):
            set_decode_rows(65)
        assert decode_rows() == 16  # a refused value changes nothing
    finally:
        set_decode_rows(None)
    assert decode_rows() == DECODE_ROWS
