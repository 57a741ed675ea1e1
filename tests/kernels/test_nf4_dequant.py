"""The NF4 dequant kernel (``fastllm.kernels.nf4``) against bitsandbytes and a float64 reference.

On the CPU the kernel runs through the Triton interpreter (small shapes: it is slow). bitsandbytes
0.50's CPU ``dequantize_4bit`` is used as the reference at blocksize 64 only, on shapes where it is
right: its native CPU kernel (taken when in_features is even) restarts the quantization blocks at every
row, so it is wrong whenever in_features is not a multiple of the blocksize (block maxima off by up to
2.5; ``test_bitsandbytes_cpu_trap`` shows it), which hits most blocksizes other than 64 (also
shared/FACTS.md); odd in_features take its generic path, which is right. Every blocksize is checked
against an independent float64 decode of the quant state, itself checked against bitsandbytes.
On a GPU (marker ``gpu``) the kernel must be bit-identical to bitsandbytes' CUDA kernel at every blocksize and dtype.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

from fastllm.kernels.nf4 import launch_config, nf4_dequant_fwd  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def quantize(shape, blocksize, nested, dtype, device="cpu"):
    w = torch.randn(shape, dtype=torch.float32, device=device).to(dtype)
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


def reference_f64(packed, qs):
    """Decode straight from the quant state in float64: code[nibble] * absmax[block]."""
    n = qs.shape.numel()
    q = packed.reshape(-1).view(torch.uint8).long()
    nib = torch.stack((q >> 4, q & 15), dim=-1).reshape(-1)[:n]  # high nibble is the even element
    if qs.nested:
        nb = qs.absmax.numel()
        a2 = qs.state2.absmax.double().repeat_interleave(qs.state2.blocksize)[:nb]
        absmax = qs.state2.code.double()[qs.absmax.long()] * a2 + qs.offset.double()
    else:
        absmax = qs.absmax.double()
    return (qs.code.double()[nib] * absmax.repeat_interleave(qs.blocksize)[:n]).reshape(qs.shape)


def run_kernel(packed, qs, dtype):
    out = torch.empty(tuple(qs.shape), dtype=dtype, device=packed.device)
    if qs.nested:
        return nf4_dequant_fwd(packed, qs.absmax, qs.code, qs.blocksize, out, qs.state2.code,
                               qs.state2.absmax, qs.offset.reshape(1), qs.state2.blocksize)
    return nf4_dequant_fwd(packed, qs.absmax, qs.code, qs.blocksize, out)


def tol(dtype):
    # The interpreter's fp32->bf16 cast may land one bf16 ulp off round-to-nearest: bf16 gets the
    # default bf16 tolerance; fp16 and fp32 are exact against bnb.
    return {"rtol": 1.6e-2, "atol": 1e-5} if dtype == torch.bfloat16 else {"rtol": 0, "atol": 0}


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (333, 77), (64, 256)])
def test_matches_bitsandbytes_blocksize64(shape, dtype, nested):
    packed, qs = quantize(shape, 64, nested, dtype)
    got = run_kernel(packed, qs, dtype)
    want = F.dequantize_4bit(packed, qs)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize_matches_f64_reference(blocksize, nested):
    packed, qs = quantize((37, 113), blocksize, nested, torch.float32)  # numel odd, not a block multiple
    want = reference_f64(packed, qs)
    for dtype in DTYPES:
        got = run_kernel(packed, qs, dtype)
        # fp32 products of an fp32-rounded absmax: within a few fp32 ulps of the exact decode.
        rtol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("nested", [True, False])
def test_f64_reference_matches_bitsandbytes(nested):
    packed, qs = quantize((333, 77), 64, nested, torch.float32)
    torch.testing.assert_close(reference_f64(packed, qs), F.dequantize_4bit(packed, qs).double(),
                               rtol=1e-6, atol=1e-7)


def test_bf16_quant_storage_is_read_as_bytes():
    w = torch.randn(16, 48)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    packed8, qs8 = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert packed.dtype == torch.bfloat16
    torch.testing.assert_close(run_kernel(packed, qs, torch.float32), run_kernel(packed8, qs8, torch.float32),
                               rtol=0, atol=0)
    torch.testing.assert_close(run_kernel(packed, qs, torch.float32).double(), reference_f64(packed8, qs8),
                               rtol=1e-6, atol=1e-7)


def test_bitsandbytes_cpu_trap():
    """bnb 0.50's native CPU dequant is wrong when in_features % blocksize != 0; ours is not."""
    packed, qs = quantize((16, 48), 64, False, torch.float32)
    want = reference_f64(packed, qs)
    torch.testing.assert_close(run_kernel(packed, qs, torch.float32).double(), want, rtol=1e-6, atol=1e-7)
    if torch.allclose(F.dequantize_4bit(packed, qs).double(), want, rtol=1e-6, atol=1e-7):
        pytest.skip("bitsandbytes' CPU dequantize_4bit is right here now: the trap is fixed upstream")
    assert (F.dequantize_4bit(packed, qs).double() - want).abs().max() > 0.1


def test_launch_config_rows_never_straddle_blocks():
    for blocksize in BLOCKSIZES:
        for n_bytes in (7, 4096, 1 << 23):
            rows, cols, warps, grid = launch_config(n_bytes, blocksize)
            assert (blocksize // 2) % cols == 0 and rows * cols * grid >= n_bytes and warps >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_gpu_bit_identical_to_bitsandbytes(blocksize, dtype, nested):
    for shape in [(5, 123), (333, 77), (1024, 4096), (4096, 14336 + 64)]:
        packed, qs = quantize(shape, blocksize, nested, dtype, device="cuda")
        got = run_kernel(packed, qs, dtype)
        assert torch.equal(got, F.dequantize_4bit(packed, qs)), (shape, blocksize, dtype, nested)


def _parts_args(packed, qs):
    n = qs.shape.numel()
    if qs.nested:
        return packed, qs.absmax, qs.code, qs.state2.code, qs.state2.absmax, qs.offset.reshape(1), n
    return packed, qs.absmax, qs.code, None, None, None, n


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("rows", [(48, 16, 16), (40, 24), (5, 3, 7)])  # (5, 3, 7) x 96: partial last blocks
def test_parts_kernel_equals_one_launch_per_weight(rows, blocksize, nested):
    """q/k/v (or gate/up) stacked in one launch: each part's rows equal its own single-weight dequant,
    with parts whose sizes are not multiples of the tile (odd block counts)."""
    from fastllm.kernels.nf4 import nf4_dequant_parts

    dtype = torch.float16
    k = 96  # 1.5 blocks of 64 per row: a block spans rows
    quants = [quantize((r, k), blocksize, nested, dtype) for r in rows]
    out = torch.full((sum(rows), k), float("nan"), dtype=dtype)
    nf4_dequant_parts([_parts_args(p, qs) for p, qs in quants], blocksize, out)
    want = torch.cat([run_kernel(p, qs, dtype) for p, qs in quants])
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [True, False])
def test_gpu_parts_kernel_bit_identical_to_bitsandbytes(nested):
    from fastllm.kernels.nf4 import nf4_dequant_parts

    for rows, k in [((4096, 1024, 1024), 4096), ((14336, 14336), 4096), ((333, 77), 96)]:
        quants = [quantize((r, k), 64, nested, torch.bfloat16, device="cuda") for r in rows]
        out = torch.empty((sum(rows), k), dtype=torch.bfloat16, device="cuda")
        nf4_dequant_parts([_parts_args(p, qs) for p, qs in quants], 64, out)
        want = torch.cat([F.dequantize_4bit(p, qs) for p, qs in quants])
        assert torch.equal(out, want), (rows, k, nested)
