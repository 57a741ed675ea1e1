"""The headline benchmark's code path on the CPU (tiny shape): it runs and the providers agree on the loss.

Timings are not checked here: they are GPU numbers, reported by ``fastllm bench train``.
"""

import pytest
import torch

from fastllm.bench.models import build_qlora_base
from fastllm.bench.train import run_worker


def test_bench_model_is_nf4_double_quant():
    import bitsandbytes as bnb

    model = build_qlora_base("tiny", "cpu")
    lin = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(lin) == 2 * 7
    assert all(m.weight.quant_state.nested and m.weight.quant_state.quant_type == "nf4" for m in lin)
    assert not any(p.requires_grad for p in model.parameters())


def test_train_worker_providers_agree_on_loss():
    providers = ("hf", "fastllm", "fastllm:loss=0,mlp=0")
    rows = [run_worker(p, "tiny", steps=2, warmup=1, batch=2, seq=32, device="cpu") for p in providers]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["steps"] == 2 and "torch" in r
    for r in rows[1:]:
        torch.testing.assert_close(torch.tensor(rows[0]["loss"]), torch.tensor(r["loss"]), rtol=2e-2, atol=2e-2)
    assert "mlp" not in rows[2]["setup"].split("skipped")[0] and "loss" in rows[2]["setup"]


def test_provider_list_keeps_options_with_their_provider():
    from fastllm.bench.train import _patch_config, split_providers

    got = split_providers("hf,fastllm:compile=1,compile_mode=max-autotune-no-cudagraphs,liger,fastllm:lora=0")
    assert got == ["hf", "fastllm:compile=1,compile_mode=max-autotune-no-cudagraphs", "liger", "fastllm:lora=0"]
    cfg = _patch_config(got[1])
    assert cfg.compile is True and cfg.compile_mode == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="compile_mode"):
        _patch_config("fastllm:compile_mode=fast")


def test_offload_provider_reaches_the_layers():
    """``fastllm:gradient_checkpointing=offload`` measures the offloading checkpoint, ``=1`` plain recompute,
    ``fastllm`` get_peft_model's default (``"auto"``) and ``memory_budget=`` a number reaches the plan."""
    from fastllm.bench.train import _prepare
    from fastllm.modules.checkpointing import nonreentrant_checkpoint, offload_checkpoint

    for provider, fn in (("fastllm:gradient_checkpointing=offload", offload_checkpoint),
                         ("fastllm:gradient_checkpointing=1", nonreentrant_checkpoint)):
        model, _ = _prepare(provider, build_qlora_base("tiny", "cpu"), True)
        layers = model.base_model.model.model.layers
        assert all(layer.gradient_checkpointing and layer._gradient_checkpointing_func is fn for layer in layers)
    for provider, budget in (("fastllm", None), ("fastllm:memory_budget=7.5", 7.5 * 2**30)):
        model, _ = _prepare(provider, build_qlora_base("tiny", "cpu"), True)
        layers = model.base_model.model.model.layers
        autos = [layer._gradient_checkpointing_func.fastllm_auto for layer in layers]
        assert all(a is autos[0] for a in autos) and autos[0].budget == budget


@pytest.mark.parametrize("shape", ["tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3"])
def test_other_architectures_build_and_agree(shape):
    """The Qwen shapes build as their own classes (Qwen2's q/k/v biases kept on the 4-bit linears) and the hf and
    fastllm providers agree on the loss."""
    from fastllm.bench.models import SHAPES

    model = build_qlora_base(shape, "cpu")
    assert model.config.model_type == SHAPES[shape]["model_type"]
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (shape == "tiny-qwen2") and attn.o_proj.bias is None
    rows = [run_worker(p, shape, steps=2, warmup=1, batch=2, seq=32, device="cpu") for p in ("hf", "fastllm")]
    torch.testing.assert_close(torch.tensor(rows[0]["loss"]), torch.tensor(rows[1]["loss"]), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", ["tiny128", "tiny-qwen2", "tiny-gemma3"])
def test_layerwise_build_is_complete_and_the_same_on_every_rank(shape):
    """``layerwise=True`` (the 70B path): the same keys as the whole-model build, nothing left on the meta device,
    the RoPE buffers the config gives, norms at their identity, NF4 linears; two builds are byte-identical (ranks)."""
    import bitsandbytes as bnb

    a, b = (build_qlora_base(shape, "cpu", dtype=torch.float32, layerwise=True) for _ in range(2))
    ref = build_qlora_base(shape, "cpu", dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(ref.state_dict()) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(t.is_meta for t in (*a.parameters(), *a.buffers()))
    for name, buf in ref.model.rotary_emb.named_buffers():
        torch.testing.assert_close(dict(a.model.rotary_emb.named_buffers())[name], buf)
    identity = 0.0 if shape == "tiny-gemma3" else 1.0
    norms = [m.weight for m in a.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(torch.all(w == identity) for w in norms)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in a.modules()) == 2 * 7
    ids = torch.randint(0, 512, (2, 17))
    assert torch.isfinite(a(input_ids=ids, labels=ids).loss)


def test_a_worker_past_its_timeout_is_an_error_row():
    """A provider that runs too long (Unsloth at 64K on a slower card) is a row with the reason, not a crash that
    loses the other providers' rows."""
    from fastllm.bench.train import spawn_command

    row = spawn_command("timeit", ["-n", "1", "import time; time.sleep(30)"], "fastllm", timeout=1)
    assert row["error"].startswith("timed out after 1 s")


def test_vision_language_shape_quantizes_and_adapts_its_language_model_only():
    """``gemma3``'s shape (Gemma3ForConditionalGeneration): the language model's 7 linears a layer in NF4, the vision
    tower and projector left in bf16; the hf provider's LoRA lands on the language model only (the table's regex,
    the adapters fastllm puts there), and the hf and fastllm providers agree on the loss of a text batch."""
    import bitsandbytes as bnb

    from fastllm.bench.train import _prepare

    model = build_qlora_base("tiny-gemma3-vision", "cpu")
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and all(".language_model.layers." in n for n in quantized)
    assert all(p.dtype == torch.bfloat16 for p in model.model.vision_tower.parameters())
    peft_model, _ = _prepare("hf-bf16", model, False)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 2 * 7 and all(".language_model.layers." in n for n in adapted)
    rows = [run_worker(p, "tiny-gemma3-vision", steps=2, warmup=1, batch=2, seq=32, device="cpu")
            for p in ("hf", "fastllm")]
    assert all(r["loss"] > 0 for r in rows)
    torch.testing.assert_close(torch.tensor(rows[0]["loss"]), torch.tensor(rows[1]["loss"]), rtol=2e-2, atol=2e-2)


def test_unsloth_fingerprint_counts_unpacked_4bit_linears_apart():
    """A loader that leaves a 4-bit linear unquantized (a plain weight, no quant_state) shows as a difference in
    the fingerprint, not as a crash of the provider."""
    from fastllm.bench.unsloth_provider import fingerprint

    model = build_qlora_base("tiny", "cpu")
    before = fingerprint(model)
    assert before["nf4_linears"] == 14 and before["unpacked_4bit_linears"] == 0
    proj = model.model.layers[0].self_attn.q_proj
    proj.weight = torch.nn.Parameter(torch.zeros(proj.out_features, proj.in_features), requires_grad=False)
    after = fingerprint(model)
    assert after["nf4_linears"] == 13 and after["unpacked_4bit_linears"] == 1 and after != before


def test_unsloth_variants_need_its_site(monkeypatch):
    from fastllm.bench.train import unavailable

    monkeypatch.delenv("UNSLOTH_SITE", raising=False)
    for provider in ("unsloth", "unsloth:compile=0"):
        assert "UNSLOTH_SITE not set" in unavailable(provider)


def test_unknown_providers_are_refused_before_any_worker_runs(tmp_path, capsys):
    from fastllm.bench import memory, train

    assert train.provider_error("hf,liger,unsloth,unsloth:compile=0,fastllm:memory_budget=7.0,lora=0,hf-bf16") is None
    for bad in ("unsloth:compile=1", "hf:x=1", "huggingface", "liger:rope=0"):
        assert bad in train.provider_error(f"hf,{bad}")
    for main in (train.main, memory.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--providers", "hf,unslot", "--device", "cpu", "--out", str(tmp_path)])
        assert exit_info.value.code == 2 and "unknown provider 'unslot'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written
