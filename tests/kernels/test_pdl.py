"""Programmatic dependent launch (``fastllm.kernels.pdl``): the decode kernels launched with it give what they give
without it, bit for bit (it moves when a kernel is scheduled, not what it computes); on the CPU (the interpreter,
no grid dependency control) the switch leaves every launch as it was."""

import pytest
import torch

from fastllm._compat import triton_usable

pytestmark = pytest.mark.skipif(not triton_usable(), reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
bnb = pytest.importorskip("bitsandbytes")

from fastllm.kernels.lora_xa import lora_xa  # noqa: E402
from fastllm.kernels.pdl import pdl_enabled, pdl_options, set_pdl  # noqa: E402
from fastllm.ops.nf4_gemv import nf4_glu_gemv, nf4_group_gemv  # noqa: E402

from .test_nf4_gemv import DEVICE, quantized  # noqa: E402


@pytest.fixture
def pdl_on():
    set_pdl(True)
    yield
    set_pdl(None)


def test_options_follow_the_switch_and_the_device(pdl_on):
    assert pdl_enabled()
    cpu = torch.zeros(1)
    assert pdl_options(cpu) == {"PDL": False}  # the interpreter has no grid dependency control
    if DEVICE == "cuda":
        want = torch.cuda.get_device_capability()[0] >= 9
        assert pdl_options(cpu.cuda()) == ({"PDL": True, "launch_pdl": True} if want else {"PDL": False})
    set_pdl(None)
    assert not pdl_enabled() and pdl_options(cpu) == {"PDL": False}


@pytest.mark.parametrize("m", [1, 3])
def test_decode_kernels_give_the_same_bits_with_pdl(m):
    dtype = torch.float16
    k, outs = 256, (96, 40, 40)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    adapters = [(torch.randn(4, k, generator=g) * 0.1).to(DEVICE) for _ in outs]
    torch.manual_seed(m)
    weights = [quantized(n, k, 64, True)[:2] for n in outs]
    bs = [(torch.randn(n, 4, generator=g) * 0.1).to(DEVICE) for n in outs]

    def run():
        part = lora_xa(x, adapters)
        items = [(p, st, None, (part[:, :, 4 * i:4 * i + 4], b, 0.5))
                 for i, ((p, st), b) in enumerate(zip(weights, bs))]
        group = nf4_group_gemv(x, items)
        glu = nf4_glu_gemv(x, (*weights[1], items[1][3]), (*weights[2], items[2][3]))
        return [part, *group, glu]

    want = run()
    set_pdl(True)
    try:
        got = run()
    finally:
        set_pdl(None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
