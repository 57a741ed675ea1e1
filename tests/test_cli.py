"""The fastllm commands end to end on the CPU: train (8-bit AdamW, resume, Ctrl-C), eval, merge, max-batch."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastllm.cli import build_parser, main

pytestmark = pytest.mark.slow
SMALL = ["--max-seq-length", "64", "--eval-blocks", "2", "--lora-r", "4"]


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_help_lists_every_command():
    text = build_parser().format_help()
    for cmd in ("train", "eval", "max-batch", "merge", "bench"):
        assert cmd in text


@pytest.fixture(scope="module")
def trained(tmp_path_factory, default_model_dir):
    """4 steps, then --resume to 6; and a straight 6-step run to compare with."""
    root = tmp_path_factory.mktemp("cli")
    split, straight = str(root / "split"), str(root / "straight")
    common = ["train", *SMALL, "--lr", "1e-3", "--optim", "adamw_8bit", "--batch-size", "2"]
    assert main([*common, "--max-steps", "4", "--save-every", "2", "--output", split]) == 0
    assert main([*common, "--max-steps", "6", "--output", split, "--resume"]) == 0
    assert main([*common, "--max-steps", "6", "--output", straight]) == 0
    return split, straight


def test_train_outputs_and_resume_continue_exactly(trained):
    split, straight = trained
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss_curve.png", "run_summary.json",
                 "checkpoint-6/trainer_state.pt", "checkpoint-6/checkpoint.json", "train_log.jsonl"):
        assert os.path.isfile(os.path.join(split, name)), name
    summary = json.load(open(os.path.join(split, "run_summary.json")))
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6 and len(summary["losses"]) == 6
    log = _lines(os.path.join(split, "train_log.jsonl"))
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    ref = json.load(open(os.path.join(straight, "run_summary.json")))
    # Same data order, RNG and optimizer state: the resumed run is the straight run.
    torch.testing.assert_close(torch.tensor(summary["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-4)


def test_resume_with_other_settings_is_refused(trained, tmp_path, capsys):
    split, _ = trained
    assert main(["train", *SMALL, "--lr", "5e-4", "--max-steps", "8", "--output", split, "--resume"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert main(["train", *SMALL, "--dtype", "fp32", "--max-steps", "8", "--output", split, "--resume"]) == 2
    assert "'dtype': ('auto', 'fp32')" in capsys.readouterr().err
    assert main(["train", *SMALL, "--output", str(tmp_path / "new"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_eval_with_and_without_adapter(trained, tmp_path, capsys):
    split, _ = trained
    results = tmp_path / "results.jsonl"
    assert main(["eval", "--max-seq-length", "64", "--eval-blocks", "4", "--results", str(results)]) == 0
    assert main(["eval", "--max-seq-length", "64", "--eval-blocks", "4", "--adapter", split,
                 "--results", str(results)]) == 0
    base, tuned = _lines(results)
    assert base["command"] == tuned["command"] == "eval" and tuned["adapter"] == split
    assert 1 < tuned["perplexity"] < base["perplexity"]


def test_merge_loads_in_plain_transformers(trained, tmp_path, default_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    split, _ = trained
    out = str(tmp_path / "merged")
    assert main(["merge", "--adapter", split, "--output", out, "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32),
                                    split)
    x = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ref(x).logits, rtol=1e-3, atol=1e-3)
    assert os.path.isfile(os.path.join(out, "tokenizer.json")) or os.path.isfile(os.path.join(out,
                                                                                             "tokenizer_config.json"))


def _wait_for(proc, path, lines: int, limit: float = 900) -> None:
    """Until ``path`` has ``lines`` lines (or the process ended): an observable event, not a guess of the speed."""
    deadline = time.time() + limit  # only against a hang; a slow machine just takes longer
    while proc.poll() is None and time.time() < deadline:
        if path.is_file() and path.read_text().count("\n") >= lines:
            return
        time.sleep(0.2)


def test_ctrl_c_saves_the_adapter_and_state(tmp_path, default_model_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastllm.cli", "train", *SMALL, "--max-steps", "500", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(proc, out / "train_log.jsonl", 2)
    assert proc.poll() is None, proc.communicate()[0][-2000:]
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 130, output[-2000:]
    assert "interrupted at step" in output
    ckpt = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["step"] >= 2 and (out / "adapter_model.safetensors").is_file()


def test_max_batch_finds_the_memory_limit(tiny_llama_dir):
    """A real allocation failure: the child process runs under an address-space limit."""
    code = (
        "import re, resource, sys\n"
        "from fastllm.cli import main\n"
        "import torch\n"
        "vm = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 1200 * 2**20, resource.RLIM_INFINITY))\n"
        f"sys.exit(main(['max-batch', '--model', {tiny_llama_dir!r}, '--max-seq-length', '512', '--cap', '4096']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["command"] == "max-batch" and 1 <= row["max_batch"] < 4096


def test_max_batch_under_the_cap(tiny_llama_dir, capsys):
    assert main(["max-batch", "--model", tiny_llama_dir, "--max-seq-length", "32", "--cap", "6"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["max_batch"] == 6
