"""The decode NF4 GEMV on a real GPU: the kernels against their torch fallback (dequant + GEMM, the LoRA term
rounded as PEFT rounds it) at 8B shapes and decode batch sizes; batched greedy generation through the GEMV and the
decode graphs equal to generating each prompt alone, the graphs replayed without recapture."""

import pytest
import torch

from fastllm import FastLlama, PatchConfig
from fastllm.modules.decode_graphs import decode_graphs_of
from fastllm.ops.nf4 import plain_tensor, state_args
from fastllm.ops.nf4_gemv import nf4_gemv, nf4_glu_gemv, set_enabled
from fastllm.patching.api import find_base

pytestmark = pytest.mark.gpu
bnb = pytest.importorskip("bitsandbytes")


def _weight(n, k, nested=True):
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    return plain_tensor(packed), state_args(qs)


def _lora(m, n, r=16):
    return (torch.randn(m, r, device="cuda", dtype=torch.bfloat16),
            torch.randn(n, r, device="cuda", dtype=torch.bfloat16) * 0.02, 2.0)


@pytest.mark.parametrize("m", [1, 8, 32, 64])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (4096, 14336), (128256 // 8, 4096)])
def test_kernel_matches_fallback_at_8b_shapes(m, n, k):
    packed, state = _weight(n, k, nested=n != 1024)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    lora = _lora(m, n)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if n == 1024 else None
    torch.testing.assert_close(nf4_gemv(x, packed, state, bias, lora), nf4_gemv(x, packed, state, bias, lora,
                                                                               backend="torch"),
                               rtol=1.6e-2, atol=2e-2)


@pytest.mark.parametrize("m", [1, 8, 32])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (4096, 14336)])
def test_byte_permute_lookup_matches_the_gathered_codes(m, n, k, monkeypatch):
    """``UNPACK`` 5 (``kernels.nf4_lut``): the compiled byte permutes give the same bits as the same kernel reading
    the codes from memory, and both the fallback's values to bf16 tolerance (one row and batches, q/k/v and down
    shapes, nested and not)."""
    import fastllm.kernels.nf4_gemv as kernels

    config = {"DOT": True, "UNPACK": 5, "BLOCK_N": 64, "STEPS": 8}
    packed, state = _weight(n, k, nested=n != 1024)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    lora = _lora(m, n)
    got = nf4_gemv(x, packed, state, None, lora, config=config)
    torch.testing.assert_close(got, nf4_gemv(x, packed, state, None, lora, backend="torch"), rtol=1.6e-2, atol=2e-2)
    monkeypatch.setattr(kernels, "lut_for", lambda code, dtype: "")
    torch.testing.assert_close(got, nf4_gemv(x, packed, state, None, lora, config=config), rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 32])
def test_glu_kernel_matches_fallback(m):
    (pg, sg), (pu, su) = _weight(14336, 4096), _weight(14336, 4096)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    xa = torch.randn(m, 32, device="cuda", dtype=torch.bfloat16)
    lg, lu = (xa[:, :16], _lora(m, 14336)[1], 2.0), (xa[:, 16:], _lora(m, 14336)[1], 2.0)
    torch.testing.assert_close(nf4_glu_gemv(x, (pg, sg, lg), (pu, su, lu)),
                               nf4_glu_gemv(x, (pg, sg, lg), (pu, su, lu), backend="torch"), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("m,config", [(1, {"BLOCK_N": 16, "BLOCK_K": 512, "STEPS": 2}),
                                      (1, {"DOT": True, "UNPACK": 5, "BLOCK_N": 128, "BLOCK_K": 64, "STEPS": 8}),
                                      (8, {"DOT": True, "BLOCK_N": 64, "BLOCK_K": 128, "STEPS": 8})])
def test_last_range_finish_equals_the_epilogue_on_the_gpu(m, config):
    """``FINISH`` (the last K range of each tile sums the partials; arrival counters, release/acquire atomics):
    the epilogue launch's bits, on q/k/v in one launch, down and gate/up, launched 20 times eagerly and replayed
    20 times from a CUDA graph (the counters reset themselves between launches)."""
    from fastllm.kernels import nf4_gemv as kernels
    from fastllm.ops.nf4_gemv import nf4_group_gemv

    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    xa = torch.randn(m, 48, device="cuda", dtype=torch.bfloat16)
    qkv = [(*_weight(n, 4096), None, (xa[:, 16 * i:16 * (i + 1)], _lora(m, n)[1], 2.0))
           for i, n in enumerate((4096, 1024, 1024))]
    (pg, sg), (pu, su) = _weight(14336, 4096), _weight(14336, 4096)
    glu = ((pg, sg, (xa[:, :16], _lora(m, 14336)[1], 2.0)), (pu, su, (xa[:, 16:32], _lora(m, 14336)[1], 2.0)))
    down_x = torch.randn(m, 14336, device="cuda", dtype=torch.bfloat16)
    down = (*_weight(4096, 14336), None, _lora(m, 4096))

    def run(cfg):
        return (*nf4_group_gemv(x, qkv, config=cfg), nf4_glu_gemv(x, *glu, config=cfg),
                nf4_gemv(down_x, *down, config=cfg))

    finish = {**config, "FINISH": True}
    want = run(config)
    for _ in range(20):
        for got, w in zip(run(finish), want):
            torch.testing.assert_close(got, w, rtol=0, atol=0)
    run(finish)  # warm-up: compiled, counters allocated before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run(finish)
    for _ in range(20):
        graph.replay()
        for got, w in zip(outs, want):
            torch.testing.assert_close(got, w, rtol=0, atol=0)
    assert int(kernels._COUNTERS[x.device].abs().sum()) == 0


def _model(path):
    model, _ = FastLlama.from_pretrained(path, dtype=torch.bfloat16, max_seq_length=256, patch=PatchConfig())
    torch.manual_seed(0)
    model = FastLlama.get_peft_model(model, r=16, lora_alpha=16)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _generate(model, x, new=12):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)  # (B, T), (B, new, V)


@pytest.fixture
def gemv_on():
    set_enabled(True)
    yield
    set_enabled(None)


def test_batched_generation_equals_one_by_one(tiny_llama_i128_dir, gemv_on):
    model = _model(tiny_llama_i128_dir)
    x = torch.randint(0, 320, (4, 9), device="cuda")
    seq, logits = _generate(model, x)
    graphs = decode_graphs_of(find_base(model))
    # one capture for the batch, the later steps replayed (prefill, a warm-up step and the capture run eagerly)
    assert graphs.stats["captured"] == 1 and graphs.stats["replayed"] >= 12 - 4, dict(graphs.stats)
    _, logits2 = _generate(model, x)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    for i in range(x.shape[0]):
        # one row and a batch of four take different GEMV modes, whose sums round differently
        one, one_logits = _generate(model, x[i:i + 1])
        _agree_until_a_near_tie(one[0], one_logits[0], seq[i], logits[i], x.shape[1], 2e-2)
    set_enabled(False)  # the same steps with bnb's GEMV (one row) and dequant + GEMM (batched): close, not equal
    ref_seq, ref = _generate(model, x)
    for i in range(x.shape[0]):
        _agree_until_a_near_tie(ref_seq[i], ref[i], seq[i], logits[i], x.shape[1], 5e-2)


def _agree_until_a_near_tie(seq, logits, want_seq, want, prompt, tol):
    """Two greedy generations whose weights are rounded differently: their tokens agree until a step whose top two
    logits are closer than that rounding, and their logits agree up to and including that step."""
    new = seq[prompt:] != want_seq[prompt:]
    j = int(new.nonzero()[0]) if new.any() else new.numel()
    if j < new.numel():
        top2 = want[j].float().topk(2).values
        assert (top2[0] - top2[1]).item() < 2 * tol, (j, top2)
    torch.testing.assert_close(logits[:j + 1], want[:j + 1], rtol=tol, atol=tol)


def test_pdl_launches_give_the_same_generation(tiny_llama_i128_dir, gemv_on):
    """The decode kernels launched with programmatic dependent launch (``kernels.pdl``), captured in decode graphs
    and replayed: the same logits bit for bit (PDL moves when a kernel is scheduled, never what it computes), and
    one row through the fused adapters' xa too."""
    from fastllm.kernels.pdl import set_pdl
    from fastllm.ops.lora import set_fused_xa

    model = _model(tiny_llama_i128_dir)
    x = torch.randint(0, 320, (4, 9), device="cuda")
    for rows in (x, x[:1]):
        for fused in (False, True):
            set_fused_xa(fused)
            try:
                _, want = _generate(model, rows)
                set_pdl(True)
                _, got = _generate(model, rows)
            finally:
                set_pdl(None)
                set_fused_xa(None)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    graphs = decode_graphs_of(find_base(model))
    assert graphs.stats["replayed"] > 0 and not graphs.stats.get("capture failed"), dict(graphs.stats)


def test_deferred_stop_check_gives_the_same_tokens(tiny_llama_i128_dir, gemv_on):
    """On CUDA the patched generate reads the stop check one step late (``modules.deferred_stop``): the same tokens
    as the per-step check, with every row stopping early by EOS (the extra step undone) and without EOS."""
    from fastllm.modules import deferred_stop

    model = _model(tiny_llama_i128_dir)
    x = torch.randint(0, 320, (2, 9), device="cuda")

    def gen(**kw):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                  pad_token_id=0, **kw)

    free = gen()
    for kw in ({}, {"eos_token_id": [int(free[0, 12]), int(free[1, 12])]}):
        before = deferred_stop.stats()["deferred"]
        got = gen(**kw)
        assert deferred_stop.stats()["deferred"] == before + 1
        deferred_stop.set_deferred_stop(False)
        try:
            want = gen(**kw)
        finally:
            deferred_stop.set_deferred_stop(None)
        assert torch.equal(got, want), (got, want)
