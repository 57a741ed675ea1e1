"""FSDP2 sharding of the 4-bit + LoRA Llama: 2 CPU ranks (gloo) against one process on the same global batch.

The multi-rank runs are real ``torchrun`` subprocesses: ``examples/train_fsdp2.py`` for training, and this
file itself (``__main__`` below) for the checks that must look inside the sharded model on each rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_fsdp2.py")
CHECK = os.path.join(ROOT, "examples", "check_adapter.py")
TIMEOUT = 240


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return env


def _run(cmd, timeout=TIMEOUT):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def _torchrun(nproc: int, *args, gpus: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return _run(cmd, timeout=600 if gpus else TIMEOUT)


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    return [x for x in lines if not x.get("summary")], lines[-1]


def _adapter(out_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


# ---- NF4Param in one process ------------------------------------------------------------------

def _params4bit(out_features=160, in_features=64, seed=0):
    """A real bnb NF4 double-quant weight (quantized by ``.to``), as the loader makes them."""
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    data = torch.randn(out_features, in_features, generator=g) * 0.05
    return bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4", compress_statistics=True,
                             blocksize=64).to("cpu")


def test_nf4param_splits_with_its_quant_state():
    import bitsandbytes.functional as bF

    from fastllm.integrations.nf4_fsdp import nf4_param_from_params4bit, shardable_rows

    w = _params4bit()
    qs = w.quant_state
    t = nf4_param_from_params4bit(w)
    assert t.shape == w.shape and t.packed.dtype == torch.uint8 and not t.requires_grad
    # A floating label over the uint8 bytes: torch <= 2.12's fully_shard makes each shard a parameter with
    # requires_grad=True before copying the real flag, which autograd refuses for integer dtypes.
    assert t.dtype == torch.float8_e4m3fn and torch.equal(t.view(torch.uint8), w.data)
    p = torch.nn.Parameter(t)
    assert isinstance(p, type(t)) and p.requires_grad
    p.requires_grad_(False)
    dense = bF.dequantize_4bit(w.data, qs)
    torch.testing.assert_close(bF.dequantize_4bit(t.packed, t.quant_state), dense, rtol=0, atol=0)
    assert shardable_rows(w.data, qs.blocksize, 2) and not shardable_rows(w.data, qs.blocksize, 3)
    # What fully_shard does: chunk, pad into new_zeros, copy, narrow; then gather by concatenation.
    halves = torch.chunk(t, 2, dim=0)
    assert [type(h).__name__ for h in halves] == ["NF4Param", "NF4Param"]
    padded = [h.new_zeros(h.shape) for h in halves]
    for p, h in zip(padded, halves):
        p.narrow(0, 0, h.shape[0]).copy_(h)
    packed = torch.cat([p.packed for p in padded])
    absmax = torch.cat([p.absmax for p in padded])
    assert torch.equal(packed, w.data) and torch.equal(absmax, qs.absmax)
    # Each half dequantizes to its rows of W (half the rows: 80 x 64 values = 80 blocks of 64).
    torch.testing.assert_close(bF.dequantize_4bit(halves[1].packed, halves[1].quant_state), dense[80:],
                               rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="corrupt"):
        t.to(torch.bfloat16)
    with pytest.raises(NotImplementedError, match="absmax"):
        t[5:100]  # not on a 64-value block boundary
    assert type(t.t()) is torch.Tensor  # the byte ops (bnb < 0.50 passes weight.t()) return plain tensors
    with pytest.raises(NotImplementedError, match=r"aten\.mul\.Tensor"):
        t * 2  # any other op raises: it would compute on the packed codes (tests/integrations/test_nf4_param.py)
    # What CPUOffloadPolicy does to a shard (to the host, back to the device per all-gather): bytes kept.
    moved = halves[0].to("cpu", non_blocking=True)
    assert type(moved) is type(t) and torch.equal(moved.packed, halves[0].packed)
    assert torch.equal(moved.absmax, halves[0].absmax)
    assert type(halves[0].view(-1)) is type(t)  # FSDP2's flat view of the local shard stays an NF4Param


def test_shard_needs_a_process_group(tiny_llama_dir):
    from fastllm import FastLlama
    from fastllm.integrations.fsdp2 import shard

    model, _ = FastLlama.from_pretrained(tiny_llama_dir, dtype=torch.float32, patch=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        shard(FastLlama.get_peft_model(model, r=4))


# ---- 2 CPU ranks vs one process ---------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """Example runs on the same global batch: 1 process, and 2 gloo ranks with gradient accumulation."""
    base = tmp_path_factory.mktemp("fsdp2")
    common = ["--model", tiny_llama_dir, "--steps", "4", "--batch-size", "4", "--seq-len", "48", "--lr", "1e-2",
              "--lora-r", "4"]
    out = {}
    for patched in (True, False):
        flag = ["--lora"] if patched else ["--no-patch"]  # patched: with the fused QLoRA linear too
        one, two = str(base / f"one-{patched}"), str(base / f"two-{patched}")
        _run([sys.executable, EXAMPLE, *common, *flag, "--out", one])
        _torchrun(2, EXAMPLE, *common, *flag, "--grad-accum", "2", "--out", two)
        out[patched] = (one, two)
    return out


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "unpatched"])
def test_two_ranks_equal_one_process(runs, patched):
    one, two = runs[patched]
    steps1, summary1 = _metrics(one)
    steps2, summary2 = _metrics(two)
    assert summary1["world_size"] == 1 and summary2["world_size"] == 2 and summary2["patched"] is patched
    assert summary2["lora"] is patched
    l1 = torch.tensor([s["loss"] for s in steps1], dtype=torch.float64)
    l2 = torch.tensor([s["loss"] for s in steps2], dtype=torch.float64)
    assert len(l1) == 4 and l1[-1] < l1[0]  # it trains
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    a1, a2 = _adapter(one), _adapter(two)
    assert sorted(a1) == sorted(a2) and len(a1) == 2 * 7 * 2  # A and B on 7 linears x 2 layers
    assert max(v.abs().max().item() for k, v in a1.items() if "lora_B" in k) > 1e-3  # B moved off zero
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-5)
    # Frozen parameters never held a gradient; the optimizer holds state for LoRA tensors only.
    assert all(s["frozen_params_with_grad"] == 0 for s in steps2)
    assert summary2["optimizer_state_tensors"] == summary2["trainable_tensors"] == 28
    # Each rank holds half the parameter bytes of the single process (4-bit bytes + absmax included).
    full = summary1["per_rank"][0]["param_mib"]
    for r in summary2["per_rank"]:
        torch.testing.assert_close(r["param_mib"], full / 2, rtol=1e-3, atol=0)


@pytest.mark.parametrize("budget,plan", [(1.0, ["keep", "keep"]), (1e-6, ["offload", "offload"])])
def test_auto_checkpointing_two_ranks_equal_one_process(runs, tiny_llama_dir, tmp_path, budget, plan):
    """``gradient_checkpointing="auto"`` under FSDP2 (``--memory-budget``): with room to keep every layer's
    activations, and with a budget below even one layer's input (every layer's input parked through the offload
    hooks, the sharded 4-bit weights gathered again in the recompute), 2 gloo ranks equal one process, and both
    equal full recompute (the ``runs`` fixture's patched run, same batch)."""
    common = ["--model", tiny_llama_dir, "--steps", "2", "--batch-size", "4", "--seq-len", "48", "--lr", "1e-2",
              "--lora-r", "4", "--lora", "--memory-budget", str(budget)]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run([sys.executable, EXAMPLE, *common, "--out", one])
    _torchrun(2, EXAMPLE, *common, "--grad-accum", "2", "--out", two)
    (steps1, summary1), (steps2, summary2) = _metrics(one), _metrics(two)
    assert summary1["checkpoint_plan"] == plan and summary2["checkpoint_plan"] == plan
    l1 = torch.tensor([s["loss"] for s in steps1], dtype=torch.float64)
    l2 = torch.tensor([s["loss"] for s in steps2], dtype=torch.float64)
    ref = torch.tensor([s["loss"] for s in _metrics(runs[True][0])[0][:2]], dtype=torch.float64)  # its first steps
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, ref, rtol=1e-6, atol=1e-6)
    a1, a2 = _adapter(one), _adapter(two)
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3"])
def test_other_architectures_two_ranks_equal_one_process(tiny_arch_dir, tmp_path, model_type):
    """FSDP2 ``shard()`` of the table's other layouts (Qwen2's q/k/v biases beside the sharded 4-bit weights, Qwen3's
    q/k norms inside the fused layer, a sliding layer whose window is shorter than the sequence), patched with the
    fused QLoRA ops: 2 gloo ranks with gradient accumulation equal one process on the same global batch."""
    common = ["--model", tiny_arch_dir(model_type), "--steps", "3", "--batch-size", "4", "--seq-len", "48",
              "--lr", "1e-2", "--lora-r", "4", "--lora"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run([sys.executable, EXAMPLE, *common, "--out", one])
    _torchrun(2, EXAMPLE, *common, "--grad-accum", "2", "--out", two)
    (steps1, _), (steps2, summary2) = _metrics(one), _metrics(two)
    assert summary2["world_size"] == 2 and summary2["patched"] and summary2["trainable_tensors"] == 28
    l1 = torch.tensor([s["loss"] for s in steps1], dtype=torch.float64)
    l2 = torch.tensor([s["loss"] for s in steps2], dtype=torch.float64)
    assert len(l1) == 3
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    a1, a2 = _adapter(one), _adapter(two)
    assert sorted(a1) == sorted(a2) and len(a1) == 28
    assert max(v.abs().max().item() for k, v in a1.items() if "lora_B" in k) > 1e-3  # the adapters trained
    for k in a1:
        # Adam steps of 1e-2 normalise each element's gradient: a near-zero one's rounding (Gemma 2's saturated
        # attention soft-cap) moves it by a few 1e-5, far below one step
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=5e-5)


def test_layerwise_build_two_ranks_equal_one_process(tmp_path):
    """``--layerwise`` (what ``--model 70b`` runs): each rank builds the shape on the meta device one decoder layer at
    a time, quantizing as it goes; both ranks build the same bytes, so 2 gloo ranks equal one process."""
    common = ["--model", "tiny128", "--layerwise", "--steps", "3", "--batch-size", "4", "--seq-len", "48",
              "--lr", "1e-2", "--lora-r", "4", "--lora"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run([sys.executable, EXAMPLE, *common, "--out", one])
    _torchrun(2, EXAMPLE, *common, "--grad-accum", "2", "--out", two)
    (steps1, summary1), (steps2, summary2) = _metrics(one), _metrics(two)
    assert summary2["world_size"] == 2 and summary2["trainable_tensors"] == 28
    torch.testing.assert_close(torch.tensor([s["loss"] for s in steps2], dtype=torch.float64),
                               torch.tensor([s["loss"] for s in steps1], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    full = summary1["per_rank"][0]["param_mib"]
    for r in summary2["per_rank"]:  # each rank keeps half the (4-bit) parameter bytes
        torch.testing.assert_close(r["param_mib"], full / 2, rtol=1e-3, atol=0)


def test_adapter_loads_in_plain_peft(runs, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one, two = runs[True]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(two, "adapter"))
    saved = _adapter(one)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    for k, v in saved.items():
        torch.testing.assert_close(loaded[k.replace(".weight", ".default.weight")], v, rtol=1e-4, atol=1e-5)
    ids = torch.randint(0, 320, (1, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_gathered_4bit_weights_are_byte_identical(tiny_llama_dir, tmp_path):
    _torchrun(2, os.path.abspath(__file__), tiny_llama_dir, str(tmp_path))
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            res = json.load(f)
        assert res["nf4_params"] == 14 and res["checked"] == 14
        assert res["mismatches"] == [], res["mismatches"]
        assert res["local_fraction"] == 0.5  # each rank holds half of the packed bytes and absmax
        assert res["frozen_with_grad"] == 0 and res["lora_with_grad"] == 28
        assert res["bf16_mp_mismatches"] == []
        assert "cpu_offload=True needs a CUDA device mesh" in res["offload_error"]
        assert "pass cpu_offload=False" in res["offload_error"]
        # Same batch, same weights: the sharded forward (fastllm NF4 linear on the gathered NF4Params)
        # gives the unsharded loss.
        assert res["nf4_linear_patched"] == 14
        torch.testing.assert_close(res["loss_sharded"], res["loss_before"], rtol=1e-6, atol=1e-6)


@pytest.mark.multigpu
def test_example_on_two_gpus(tmp_path, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "fsdp2-gpu-cache"  # one random 1B checkpoint for all GPU tests
    common = ["--model", "1b", "--steps", "6", "--batch-size", "4", "--seq-len", "512", "--cache-dir", str(cache)]
    _run([sys.executable, EXAMPLE, *common, "--out", str(tmp_path / "one")], timeout=600)
    _torchrun(2, EXAMPLE, *common, "--out", str(tmp_path / "two"), gpus=True)
    l1 = torch.tensor([s["loss"] for s in _metrics(tmp_path / "one")[0]])
    l2 = torch.tensor([s["loss"] for s in _metrics(tmp_path / "two")[0]])
    torch.testing.assert_close(l2, l1, rtol=2e-3, atol=2e-3)  # bf16 compute: reduction order differs
    # The adapter saved on rank 0 loads in plain transformers + PEFT, every tensor installed as saved,
    # and scores a batch like the 1-GPU adapter.
    _run([sys.executable, CHECK, "--base", str(cache / "random-llama-1b"),
          "--adapter", str(tmp_path / "two" / "adapter"), "--reference", str(tmp_path / "one" / "adapter"),
          "--json", str(tmp_path / "check.json")], timeout=600)
    with open(tmp_path / "check.json") as f:
        res = json.load(f)
    assert res["tensors"] == res["checked"] == 2 * 7 * 16 and res["not_installed"] == [] and res["same_keys"]
    assert res["lora_B_max_abs"] > 1e-4  # training moved B off zero
    assert res["max_rel_err"] < 0.1, res
    torch.testing.assert_close(res["loss"], res["reference_loss"], rtol=1e-3, atol=1e-3)


# ---- the per-rank worker (run by torchrun on this file) ---------------------------------------

def _compare(model, ref, tag, mismatches):
    """Unshard each layer and compare every gathered NF4Param with the bytes loaded before sharding."""
    import bitsandbytes.functional as bF

    from fastllm._compat import is_linear4bit
    from fastllm.integrations.fsdp2 import NF4Param

    checked = 0
    for layer in model.base_model.model.model.layers:
        layer.unshard()
        for name, m in layer.named_modules():
            if not is_linear4bit(m):
                continue
            w = m.weight
            if not isinstance(w, NF4Param):
                mismatches.append(f"{tag}:{name} not sharded")
                continue
            packed, absmax, dense = ref[id(m)]
            qs = w.quant_state
            ok = (torch.equal(w.packed, packed) and torch.equal(w.absmax, absmax)
                  and torch.equal(bF.dequantize_4bit(w.packed, qs), dense))
            if not ok:
                mismatches.append(f"{tag}:{name}")
            checked += 1
        layer.reshard()
    return checked


def _worker(model_dir: str, out_dir: str) -> None:
    import bitsandbytes.functional as bF
    import torch.distributed as dist

    from fastllm import FastLlama, PatchConfig, patch_report
    from fastllm._compat import is_linear4bit
    from fastllm.integrations.fsdp2 import NF4Param, shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    res = {"mismatches": [], "bf16_mp_mismatches": []}
    for mp, key in ((None, "mismatches"), ("bf16", "bf16_mp_mismatches")):
        # fastllm's own NF4 linear (torch path on the CPU) reads the gathered NF4Param directly.
        model, _ = FastLlama.from_pretrained(model_dir, dtype=torch.float32, patch=PatchConfig(nf4_linear=True))
        torch.manual_seed(0)
        model = FastLlama.get_peft_model(model, r=4)
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero B, so the LoRA path shows in the loss
                torch.nn.init.normal_(p, std=0.05)
        ids = torch.randint(0, 320, (2, 24))
        if mp is None:
            res["nf4_linear_patched"] = patch_report(model).counts.get("nf4_linear", 0)
            res["loss_before"] = model(input_ids=ids, labels=ids).loss.item()
        ref = {id(m): (m.weight.data.clone(), m.weight.quant_state.absmax.clone(),
                       bF.dequantize_4bit(m.weight.data, m.weight.quant_state))
               for m in model.modules() if is_linear4bit(m)}
        if mp is None:
            try:  # the check runs before anything is changed, so the same model is sharded below
                shard(model, cpu_offload=True)
            except ValueError as e:
                res["offload_error"] = str(e)
        shard(model, mixed_precision=mp)
        nf4 = [p for p in model.parameters() if isinstance(getattr(p, "_local_tensor", None), NF4Param)]
        if mp is None:
            res["nf4_params"] = len(nf4)
            res["local_fraction"] = (sum(p._local_tensor.packed.numel() for p in nf4)
                                     / sum(p.numel() for p in nf4))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if mp is None:
            res["loss_sharded"] = loss.item()
            res["frozen_with_grad"] = sum(1 for p in model.parameters() if not p.requires_grad and p.grad is not None)
            res["lora_with_grad"] = sum(1 for p in model.parameters() if p.requires_grad and p.grad is not None)
        res["checked"] = _compare(model, ref, f"mp={mp}", res[key])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    from test_fsdp2_trainer import _leave  # this file runs as a script: its folder is on sys.path

    _leave(dist)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])


def test_plain_tensor_unwraps_params4bit_but_not_the_fsdp2_wrapper():
    """The fused QLoRA ops take plain aliases of bnb's Params4bit (no __torch_function__ per read). FSDP2's
    NF4Param has no storage of its own (its data_ptr() is an override onto the packed bytes): left as is."""
    from fastllm.integrations.nf4_fsdp import nf4_param_from_params4bit
    from fastllm.ops.nf4 import plain_tensor

    w = _params4bit()
    alias = plain_tensor(w)
    assert type(alias) is torch.Tensor and alias.data_ptr() == w.data_ptr() and torch.equal(alias, w.data)
    t = nf4_param_from_params4bit(w)
    assert plain_tensor(t) is t and t.data_ptr() == w.data_ptr()
    plain = torch.zeros(3)
    assert plain_tensor(plain) is plain
