"""``fastllm bench grpo`` on the CPU: its tokenizer, a real (tiny) TRL GRPO run through each provider's measuring
code, and its argument errors. The timings are GPU measurements."""

import pytest
import torch

from fastllm.bench import grpo


def test_word_tokenizer_is_one_token_per_word_over_the_whole_vocabulary():
    tok = grpo.word_tokenizer(1000)
    assert len(tok) == 1000 and (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    ids = [3, 17, 999, 500]
    text = " ".join(f"w{i}" for i in ids)
    assert tok(text, add_special_tokens=False).input_ids == ids
    assert tok.decode(ids) == text
    batch = tok(["w5 w6 w7", "w8"], padding=True, return_tensors="pt")
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]  # left padding, as generation wants it


def test_reward_is_the_share_of_even_ids():
    assert grpo._reward(["w4 w5 w6 w7", "w3", ""]) == [0.5, 0.0, 0.0]


@pytest.mark.slow
# unsloth: a GPU provider (its own site, CUDA only); fastllm:dense is fastllm with a switch its GPU rows measure
@pytest.mark.parametrize("provider", ["hf", "fastllm"])
def test_measure_runs_trl_grpo_steps_of_exact_length(provider):
    pytest.importorskip("trl")
    row = grpo.measure(provider, "tiny", torch.device("cpu"), prompts=2, generations=2, prompt=5, new_tokens=6,
                       steps=1, warmup=1)
    assert row["patched"] is provider.startswith("fastllm")
    assert row["new_tokens_seen"] == [6]  # min_new_tokens: every completion is full length
    assert 0 < row["generate_s"] < row["step_s"] and row["train_s"] == pytest.approx(row["step_s"] - row["generate_s"])
    assert row["tokens_per_s"] == pytest.approx(4 * 11 / row["step_s"])
    assert row["loss"] is not None and torch.isfinite(torch.tensor(row["loss"]))


@pytest.mark.parametrize("argv,message", [
    (["--providers", "hf,vllm"], "unknown provider(s) ['vllm']"),
    (["--shapes", "3b"], "unknown shape(s) ['3b']"),
    (["--generations", "1"], "--generations at least 2"),
    (["--new-tokens", "0"], "--new-tokens"),
])
def test_bad_arguments_are_named(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        grpo.main(argv)
    assert done.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_needs_cuda(capsys):
    with pytest.raises(SystemExit):
        grpo.main(["--shapes", "tiny"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_unsloth_without_its_site_is_a_row_error(monkeypatch, tmp_path):
    import argparse

    monkeypatch.delenv("UNSLOTH_SITE", raising=False)
    args = argparse.Namespace(prompts=2, generations=2, prompt=4, new_tokens=4, steps=1, warmup=0, timeout=60)
    (row,) = grpo.run("tiny", ["unsloth"], args, str(tmp_path / "grpo.jsonl"))
    assert row["provider"] == "unsloth" and "UNSLOTH_SITE not set" in row["error"]
    assert (tmp_path / "grpo.jsonl").read_text().count("UNSLOTH_SITE") == 1


def test_the_cli_lists_it():
    from fastllm.cli import BENCHES

    assert BENCHES["grpo"] == "fastllm.bench.grpo"
