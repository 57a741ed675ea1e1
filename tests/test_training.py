"""Training end to end on the CPU: QLoRA loss falls, patched tracks eager, eval-then-train stays correct."""

import pytest
import torch

from fastllm import FastLlama, eager
from fastllm.training import perplexity, train


def _blocks(n=8, t=48, seed=3):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


def _qlora(path, patch=True, seed=0, **kw):
    model, _ = FastLlama.from_pretrained(path, patch=patch, **kw)
    torch.manual_seed(seed)
    return FastLlama.get_peft_model(model, r=8, lora_alpha=16)


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_short_qlora_run_loss_decreases(tiny_llama_dir):
    model = _qlora(tiny_llama_dir)
    data = _blocks(n=4)
    before = perplexity(model, data)
    result = train(model, data, max_steps=12, batch_size=2, lr=1e-2, progress=False)
    after = perplexity(model, data)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert after < 0.8 * before, (before, after)


def test_patched_and_eager_training_curves_agree(tiny_llama_dir):
    """Same seed, same data, 6 AdamW steps: the fastllm-patched QLoRA model tracks plain transformers+PEFT."""
    patched = _qlora(tiny_llama_dir, patch=True)
    plain = _qlora(tiny_llama_dir, patch=False)
    for (na, pa), (nb, pb) in zip(patched.named_parameters(), plain.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    init = _lora_state(plain)
    data = _blocks()
    r1 = train(patched, data, max_steps=6, batch_size=2, lr=5e-3, progress=False)
    r2 = train(plain, data, max_steps=6, batch_size=2, lr=5e-3, progress=False)
    torch.testing.assert_close(torch.tensor(r1.losses), torch.tensor(r2.losses), rtol=2e-2, atol=2e-2)
    assert r1.losses[-1] < r1.losses[0]
    # Adam turns tiny gradient differences on near-zero entries into full-size steps, so compare the
    # LoRA updates as a whole: relative difference of the total update, well under what 6 steps move.
    a, b = _lora_state(patched), _lora_state(plain)
    da = torch.cat([(a[n] - init[n]).flatten() for n in a])
    db = torch.cat([(b[n] - init[n]).flatten() for n in b])
    assert db.norm() > 0
    assert ((da - db).norm() / db.norm()).item() < 0.1


def test_eval_then_train_gives_the_same_gradients(tiny_llama_dir):
    """bitsandbytes' AVX512-BF16 CPU path would repack weights on an eval forward and break training."""
    a = _qlora(tiny_llama_dir, seed=1)
    b = _qlora(tiny_llama_dir, seed=1)
    x = _blocks(n=2)
    a.eval()
    with torch.no_grad():
        a(input_ids=x)
        a.generate(input_ids=x[:, :5], max_new_tokens=3, do_sample=False)
    a.train(), b.train()
    a(input_ids=x, labels=x).loss.backward()
    b(input_ids=x, labels=x).loss.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.requires_grad:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_eager_context_on_a_training_model(tiny_llama_dir):
    model = _qlora(tiny_llama_dir)
    x = _blocks(n=2)
    model.train()
    patched_loss = model(input_ids=x, labels=x).loss
    with eager(model):
        eager_loss = model(input_ids=x, labels=x).loss
    torch.testing.assert_close(patched_loss, eager_loss, rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_cli_train_on_the_default_model(tmp_path, default_model_dir):
    """`fastllm train` on the embedded SmolLM2 + King James text: perplexity falls; the adapter loads in PEFT."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fastllm.cli import main

    out = tmp_path / "run"
    assert main(["train", "--max-steps", "10", "--eval-blocks", "8", "--output", str(out)]) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert len(summary["losses"]) == 10
    assert summary["perplexity_after"] < summary["perplexity_before"]
    assert summary["sample"].strip()
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(out))
    lora = [n for n, _ in loaded.named_parameters() if "lora_A" in n]
    assert len(lora) == 30 * 7


@pytest.mark.slow
def test_single_gpu_example_runs_on_cpu(default_model_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "examples/train_single_gpu.py", "--max-steps", "2", "--seq-len", "64"],
                          capture_output=True, text=True, timeout=600,
                          cwd=__import__("pathlib").Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 2: loss" in proc.stdout and "patched loss" in proc.stdout and "unpatched" in proc.stdout


def _interrupted_then_resumed(path, tmp_path, signals: int):
    """12 steps with ``signals`` SIGINTs sent inside step 9's forward, then resumed to 12 in a fresh model."""
    import os
    import signal

    model = _qlora(path)
    calls = []

    def hook(module, args, kwargs):
        calls.append(1)
        if len(calls) == 9:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    data = _blocks(n=10)
    first = train(model, data, max_steps=12, batch_size=2, lr=5e-3, progress=False, save_dir=str(tmp_path))
    handle.remove()
    assert first.interrupted
    resumed = train(_qlora(path), data, max_steps=12, batch_size=2, lr=5e-3, progress=False,
                    save_dir=str(tmp_path), resume_from=str(tmp_path))
    return first, resumed


@pytest.mark.parametrize("signals", [1, 2])
def test_resume_after_ctrl_c_mid_step_is_exact(tiny_llama_dir, tmp_path, signals):
    """One Ctrl-C finishes step 9 and saves it; a second drops the unfinished step (its batch is drawn again)."""
    straight = train(_qlora(tiny_llama_dir), _blocks(n=10), max_steps=12, batch_size=2, lr=5e-3, progress=False)
    first, resumed = _interrupted_then_resumed(tiny_llama_dir, tmp_path, signals)
    assert first.steps == (9 if signals == 1 else 8)
    assert resumed.resumed_from_step == first.steps and len(resumed.losses) == 12
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses), rtol=1e-5, atol=1e-5)


def test_train_refuses_bad_arguments(tiny_llama_dir):
    model = _qlora(tiny_llama_dir)
    for kw in (dict(max_steps=0), dict(max_steps=2, grad_accum=0), dict(max_steps=2, batch_size=True),
               dict(max_steps=2, lr=float("nan"))):
        with pytest.raises(ValueError):
            train(model, _blocks(n=4), progress=False, **kw)
