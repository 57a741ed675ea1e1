"""``fastllm bench generate`` on the CPU: the bytes a decode step reads (its bandwidth limit) on the tiny shape
against a count from the quant states, and its argument errors. The timings are GPU measurements."""

import pytest
import torch

from fastllm.bench import generate


def test_step_bytes_counts_packed_weights_adapters_head_and_cache():
    bnb = pytest.importorskip("bitsandbytes")
    from fastllm import FastLlama
    from fastllm.bench.models import build_qlora_base

    model = FastLlama.get_peft_model(build_qlora_base("tiny", "cpu"), r=4, lora_alpha=8)
    cfg = model.config
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears
    packed = sum(m.weight.numel() for m in linears)  # uint8: one byte per two weights
    absmax = sum(m.weight.quant_state.absmax.numel() for m in linears)  # uint8 codes under double quant
    adapters = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)  # fp32 masters
    head = cfg.vocab_size * cfg.hidden_size * 2 * (not cfg.tie_word_embeddings)
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size * 2
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    for batch, context in ((1, 10), (3, 77)):
        want = packed + absmax + adapters + head + norms + batch * (cfg.hidden_size * 2 + context * kv)
        assert generate.step_bytes(model, batch, context) == want


@pytest.mark.parametrize("argv,message", [
    (["--providers", "hf,vllm"], "unknown provider(s) ['vllm']"),
    (["--shapes", "3b"], "unknown shape(s) ['3b']"),
    (["--batches", "1,x"], "--batches takes comma-separated integers"),
    (["--batches", "0"], "--batches takes positive integers"),
])
def test_bad_arguments_are_named(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        generate.main(argv)
    assert done.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_needs_cuda(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--shapes", "tiny"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_cli_lists_it():
    from fastllm.cli import BENCHES

    assert BENCHES["generate"] == "fastllm.bench.generate"


def test_adopt_best_takes_the_fastest_config_that_ran_everywhere(monkeypatch):
    from fastllm.kernels import nf4_gemv as kernels

    monkeypatch.setattr(kernels, "ROW_CONFIG", dict(kernels.ROW_CONFIG))
    monkeypatch.setattr(kernels, "DOT_CONFIG", dict(kernels.DOT_CONFIG))
    monkeypatch.setattr(kernels, "ROWS_CONFIG", dict(kernels.ROWS_CONFIG))
    a = {"BLOCK_N": 2, "BLOCK_K": 512, "num_warps": 4, "UNPACK": 0}
    b = {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 8, "UNPACK": 1}
    c = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "UNPACK": 1}
    d = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "UNPACK": 0}
    e = {"DOT": False, "BLOCK_N": 4, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1, "UNPACK": 3, "STEPS": 2}
    sweep = [
        {"proj": "q", "rows": 1, **a, "us": 5.0}, {"proj": "down", "rows": 1, **a, "us": 9.0},
        {"proj": "q", "rows": 1, **b, "us": 4.0}, {"proj": "down", "rows": 1, **b, "us": 8.0},  # b: fastest sum
        {"proj": "q", "rows": 8, **c, "us": 1.0}, {"proj": "down", "rows": 8, **c, "error": "out of resources"},
        {"proj": "q", "rows": 8, **d, "us": 6.0}, {"proj": "down", "rows": 8, **d, "us": 7.0},  # c failed once
        {"proj": "q", "rows": 32, **d, "us": 6.5}, {"proj": "down", "rows": 32, **d, "us": 7.5},
        # the CUDA cores' several-row path: faster than the tensor cores at 8 rows, slower at 32
        {"proj": "q", "rows": 8, **e, "us": 2.0}, {"proj": "down", "rows": 8, **e, "us": 3.0},
        {"proj": "q", "rows": 32, **e, "us": 9.0}, {"proj": "down", "rows": 32, **e, "us": 9.5},
    ]
    chosen = generate.adopt_best(sweep)
    assert chosen["row"] == {**kernels.ROW_CONFIG} and {k: chosen["row"][k] for k in b} == b
    assert {k: chosen["dot"][k] for k in d} == d and kernels.DOT_CONFIG["BLOCK_N"] == 64
    assert {k: chosen["rows"][k] for k in e if k != "DOT"} == {k: v for k, v in e.items() if k != "DOT"}
    assert kernels.ROWS_CONFIG["MAX_M"] == chosen["rows"]["MAX_M"] == 8


def test_providers_set_the_decode_switches_and_the_next_one_resets_them():
    """Each provider's row runs under its own switches (the GEMV off, its row cap, dense copies), and the next
    provider starts from the defaults again."""
    from fastllm import FastLlama
    from fastllm._compat import triton_available
    from fastllm.bench.models import build_qlora_base
    from fastllm.kernels import nf4_gemv as kernels
    from fastllm.kernels.pdl import pdl_enabled as pdl_on
    from fastllm.ops import dense_decode
    from fastllm.ops.lora import fused_xa
    from fastllm.ops.nf4_gemv import DECODE_ROWS, decode_rows, gemv_enabled

    def gemv_on():
        return gemv_enabled(torch.device("cuda"))

    model = FastLlama.get_peft_model(build_qlora_base("tiny", "cpu"), r=4, lora_alpha=8)
    try:
        generate._select(model, "fastllm:rows=8")
        assert decode_rows() == 8 and gemv_on() == triton_available()
        generate._select(model, "fastllm:gemv=off")
        assert decode_rows() == DECODE_ROWS and not gemv_on()
        assert generate._select(model, "hf+static") == {"cache_implementation": "static"}
        assert decode_rows() == DECODE_ROWS and gemv_on() == triton_available() and not dense_decode.enabled()
        generate._select(model, "fastllm:xa=fused+pdl")  # options joined by "+"
        assert fused_xa() and pdl_on()
        generate._select(model, "fastllm:rows=16")
        assert decode_rows() == 16 and not fused_xa() and not pdl_on()
        row, dot = dict(kernels.ROW_CONFIG), dict(kernels.DOT_CONFIG)
        generate._select(model, "fastllm:lut")
        assert kernels.ROW_CONFIG["UNPACK"] == kernels.DOT_CONFIG["UNPACK"] == 5 and kernels.ROW_CONFIG["DOT"]
        generate._select(model, "fastllm")
        assert (kernels.ROW_CONFIG, kernels.DOT_CONFIG) == (row, dot)
    finally:
        generate._select(model, "fastllm")
