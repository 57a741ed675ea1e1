"""``use_gradient_checkpointing="auto"``: the per-layer plan under a budget, and loss and LoRA grads equal to full
recompute whatever it chooses (QLoRA, the fused ops and the fused decoder layer on, fp32 on the CPU)."""

import subprocess
import sys

import pytest
import torch

from fastllm import FastLlama, PatchConfig, patch_report, unpatch
from fastllm.modules.auto_checkpoint import MIN_TILE_ROWS, AutoCheckpoint, _Calibration, lean_tile_rows, plan_layers
from fastllm.modules.layer import LAYER_CALLS


def test_plan_layers_keeps_most_then_recomputes_then_offloads():
    assert plan_layers(4, 100.0, 10.0, 1.0) == ("keep",) * 4
    # 25 bytes: two layers kept (20), the 5 left hold the two other inputs
    assert plan_layers(4, 25.0, 10.0, 1.0) == ("recompute", "recompute", "keep", "keep")
    assert plan_layers(4, 21.5, 10.0, 1.0) == ("offload", "recompute", "keep", "keep")
    assert plan_layers(3, 2.0, 10.0, 1.0) == ("offload", "recompute", "recompute")
    assert plan_layers(3, 0.5, 10.0, 1.0) == ("offload",) * 3
    assert plan_layers(3, -5.0, 10.0, 1.0) == ("offload",) * 3  # over budget already: the leanest plan


def test_lean_tile_rows_covers_the_overshoot_with_few_tiles():
    row = 3 * 14336 * 2  # an 8B layer's MLP buffers a row, bf16
    # 4,096 tokens, 58 MB over: 2,048-row tiles save 2,048 rows (~176 MB), enough with the margin; two tiles
    assert lean_tile_rows(4096, 58e6, row) == 2048
    assert lean_tile_rows(4096, 200e6, row) == 1024  # 200 MB x 1.25 takes 2,907 rows out: 1,189 left -> 1,024
    assert lean_tile_rows(4096, 270e6, row) == MIN_TILE_ROWS  # 3,924 rows out: 172 left, below the floor
    assert lean_tile_rows(4096, 1e12, row) == MIN_TILE_ROWS
    assert lean_tile_rows(4096, 58e6, row, cap=1024) == 1024  # a checked pass found 2,048 too many
    assert lean_tile_rows(5000, 0.0, 0.0) == 4096  # no estimate: the largest power of two below the batch
    assert lean_tile_rows(100, 1.0, row) == MIN_TILE_ROWS


def test_a_tiled_pass_over_its_budget_halves_the_tiles(monkeypatch):
    """The first tiled pass is checked like a planned one: over the budget, the next plans halve the tiles (down
    to ``MIN_TILE_ROWS``, then no more checks); under it, the tiles stay."""
    auto, cal = AutoCheckpoint(2, None, budget=1000.0), _Calibration(4096, 0.0, overhead=0.0, warm=True)
    peak = {"bytes": 1500}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["bytes"])
    auto._check = (cal, 1000.0, 1024)
    auto._correct(torch.device("cuda"))
    assert cal.tile_cap == 512 and not cal.tile_checked and cal.overhead == 0.0 and auto._check is None
    auto._check = (cal, 1000.0, MIN_TILE_ROWS)
    auto._correct(torch.device("cuda"))
    assert cal.tile_cap == MIN_TILE_ROWS and cal.tile_checked
    peak["bytes"] = 900
    cal2 = _Calibration(4096, 0.0, overhead=0.0, warm=True, tile_checked=True)
    auto._check = (cal2, 1000.0, 2048)
    auto._correct(torch.device("cuda"))
    assert cal2.tile_cap is None and cal2.overhead == 0.0


def _model(path, mode, budget=None, seed=0):
    model, _ = FastLlama.from_pretrained(path, dtype=torch.float32, max_seq_length=256,
                                         patch=PatchConfig(lora=True, nf4_linear=True))
    torch.manual_seed(seed)
    model = FastLlama.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=mode, memory_budget=budget)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B: every adapter gradient is non-zero
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    assert sorted(ga) == sorted(gb) and len(ga) == 28
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6)


def _ids(n=2, t=37, seed=3):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


def test_auto_plans_under_a_budget_and_matches_full_recompute(tiny_llama_dir):
    ids = _ids()
    ref = _step(_model(tiny_llama_dir, True), ids)
    model = _model(tiny_llama_dir, "auto", budget=1000.0)
    auto = patch_report(model).live["gradient_checkpointing"]
    LAYER_CALLS.clear()
    _same(_step(model, ids), ref)  # the calibration pass: layer 0 kept and counted, layer 1 recomputed (fused op)
    assert auto.plan == ("measure", "recompute") and LAYER_CALLS["fused"] == 1
    (cal,) = auto.calibrations
    tokens = ids.numel()
    keep = cal.keep_per_token * tokens
    inp = tokens * 64 * 4  # hidden 64, fp32
    assert cal.tokens == tokens and keep > 4 * inp  # a kept layer saves far more than its input
    cases = {1000.0 * 2**30: ("keep", "keep"),              # room to spare: nothing recomputed
             1.5 * keep: ("recompute", "keep"),             # one layer kept, the other's input fits
             0.5 * inp: ("offload", "offload")}             # not even an input: every input parked
    for budget, plan in cases.items():
        auto.budget = budget
        LAYER_CALLS.clear()
        _same(_step(model, ids), ref)
        assert auto.plan == plan
        assert LAYER_CALLS["fused"] == sum(m != "keep" for m in plan)  # recompute / offload run the fused op
    assert len(auto.calibrations) == 1 and "2 offload" in patch_report(model).summary()


def test_auto_calibrates_again_only_for_a_longer_batch(tiny_llama_dir):
    model = _model(tiny_llama_dir, "auto", budget=1000.0)
    auto = patch_report(model).live["gradient_checkpointing"]
    _step(model, _ids(2, 37))
    _step(model, _ids(2, 20))  # shorter: planned from the calibration at 74 tokens
    assert auto.plan == ("keep", "keep") and len(auto.calibrations) == 1
    ref = _step(_model(tiny_llama_dir, True), _ids(3, 41))
    _same(_step(model, _ids(3, 41)), ref)  # longer: measured again, same maths
    assert auto.plan[0] == "measure" and [c.tokens for c in auto.calibrations] == [123]
    _step(model, _ids(2, 37))
    assert auto.plan == ("keep", "keep")


def test_auto_without_a_budget_on_the_cpu_recomputes_every_layer(tiny_llama_dir):
    model = _model(tiny_llama_dir, "auto")  # the default of get_peft_model
    ids = _ids()
    ref = _step(_model(tiny_llama_dir, True), ids)
    LAYER_CALLS.clear()
    _same(_step(model, ids), ref)
    auto = patch_report(model).live["gradient_checkpointing"]
    assert auto.plan == ("recompute", "recompute") and LAYER_CALLS["fused"] == 2 and not auto.calibrations
    with torch.no_grad():  # no grad: no plan, nothing saved
        model(input_ids=ids)
    assert auto.passes == 1
    layers = model.base_model.model.model.layers
    assert all(getattr(layer._gradient_checkpointing_func, "fastllm_auto", None) is auto for layer in layers)
    unpatch(model)
    assert all(not hasattr(layer._gradient_checkpointing_func, "fastllm_auto") for layer in layers)


def test_auto_is_the_default_and_bad_budgets_name_the_fix(tiny_llama_dir, tmp_path):
    model = _model(tiny_llama_dir, "auto")
    assert "auto" in patch_report(model).backends["gradient_checkpointing"]
    for bad in (0, -1.0, True, "8"):
        with pytest.raises(ValueError, match="memory_budget must be a positive number of GiB"):
            PatchConfig(gradient_checkpointing="auto", memory_budget=bad)
    with pytest.raises(ValueError, match="gradient_checkpointing must be None, True, False, 'offload' or 'auto'"):
        PatchConfig(gradient_checkpointing="sometimes")
    base, _ = FastLlama.from_pretrained(tiny_llama_dir, dtype=torch.float32, max_seq_length=64)
    with pytest.raises(ValueError, match="memory_budget applies to use_gradient_checkpointing='auto'"):
        FastLlama.get_peft_model(base, use_gradient_checkpointing=True, memory_budget=4.0)
    assert not any("lora_" in n for n, _ in base.named_parameters())  # refused before anything was wrapped
    proc = subprocess.run([sys.executable, "-m", "fastllm.cli", "train", "--model", tiny_llama_dir,
                           "--gradient-checkpointing", "on", "--memory-budget", "4", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--memory-budget applies to --gradient-checkpointing auto" in proc.stderr
