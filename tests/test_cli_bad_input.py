"""``fastllm train`` / ``eval`` on bad input and interruption: one line naming the fix and exit status 2 for bad
input, never a traceback or a silent run on garbage; checkpoints that survive Ctrl-C, SIGTERM and kill -9.

A tiny Llama with a tiny byte-level BPE tokenizer (and a tiny GGUF of both) keeps every run to seconds.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastllm.cli import main

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
         "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.")
FAST = ["--max-seq-length", "32", "--eval-blocks", "2", "--lora-r", "4", "--batch-size", "2"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([WORDS] * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_llama_dir):
    """conftest's tiny Llama (vocab 320) plus a tokenizer with a chat template: what the CLI needs."""
    path = tmp_path_factory.mktemp("tiny_tok_llama")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    _tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "verses.jsonl"
    words = WORDS.split()
    recs = [{"text": " ".join(words[i % 20:i % 20 + 12])} for i in range(200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def _train(tiny_dir, data, out, *extra):
    return main(["train", "--model", tiny_dir, "--data", data, *FAST, "--output", str(out), *extra])


def test_smoke_tiny_run(tiny_dir, data, tmp_path, capsys):
    assert _train(tiny_dir, data, tmp_path / "run", "--max-steps", "3") == 0


def _err(capsys) -> str:
    """The one line a bad input prints (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("args, hint", [
    (["--max-steps", "0"], "--max-steps: must be at least 1"),
    (["--max-steps", "-3"], "--max-steps: must be at least 1"),
    (["--grad-accum", "0"], "--grad-accum: must be at least 1"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--max-seq-length", "1"], "--max-seq-length: must be at least 2"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--lora-r", "0"], "--lora-r: must be at least 1"),
    (["--output", ""], "--output: must not be empty"),
    (["--eval-blocks", "0"], "--eval-blocks: must be at least 1"),
])
def test_bad_arguments_are_one_line_exit_2(args, hint, capsys):
    assert main(["train", *args]) == 2
    line = _err(capsys)
    assert hint in line and capsys.readouterr().out == ""


BAD_DATA = {
    "empty.txt": (b"", "is empty"),
    "blank.txt": (b"  \n\n \t\n", "is empty"),
    "binary.txt": (bytes(range(256)) * 4, "looks binary"),
    "latin1.txt": ("café au lait\n".encode("latin-1"), "not UTF-8"),
    "bad.jsonl": (b'{"text": "a"}\n{"text": oops}\n', "line 2"),
    "empty.json": (b"", "is empty"),
    "roles.jsonl": (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "unknown role"),
    "null.jsonl": (json.dumps({"text": None}).encode(), "'text' must be a string"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_files(name, tiny_dir, tmp_path, capsys):
    content, hint = BAD_DATA[name]
    (tmp_path / name).write_bytes(content)
    assert _train(tiny_dir, str(tmp_path / name), tmp_path / "out", "--max-steps", "2") == 2
    assert hint in _err(capsys)


def test_data_directory_and_missing_path(tiny_dir, tmp_path, capsys):
    assert _train(tiny_dir, str(tmp_path), tmp_path / "out", "--max-steps", "2") == 2
    assert "is a directory" in _err(capsys)
    assert _train(tiny_dir, str(tmp_path / "nope.jsonl"), tmp_path / "out2", "--max-steps", "2") == 2
    assert "no such data file" in _err(capsys)


def _good_data(tmp_path):
    para = " ".join([WORDS] * 12)
    chat = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": WORDS},
                              {"from": "gpt", "value": WORDS[:60]}]}
    return {
        "bom.jsonl": b"\xef\xbb\xbf" + b"".join(json.dumps({"text": WORDS}).encode() + b"\n" for _ in range(20)),
        "sharegpt.jsonl": b"".join(json.dumps(chat).encode() + b"\n" for _ in range(20)),
        "paragraph.txt": para.encode(),
        "oneline.txt": (" ".join([WORDS] * 40)).encode(),
        "UPPER.JSONL": b"".join(json.dumps({"text": WORDS}).encode() + b"\n" for _ in range(20)),
        "lines.ndjson": b"".join(json.dumps({"text": WORDS}).encode() + b"\n" for _ in range(20)),
    }


def test_accepted_data_shapes_train(tiny_dir, tmp_path):
    """A BOM, ShareGPT records, one long paragraph, one huge line, .JSONL and .ndjson all train."""
    for i, (name, content) in enumerate(_good_data(tmp_path).items()):
        (tmp_path / name).write_bytes(content)
        assert _train(tiny_dir, str(tmp_path / name), tmp_path / f"out{i}", "--max-steps", "1") == 0, name


@pytest.fixture(scope="module")
def run4(tiny_dir, data, tmp_path_factory):
    """A finished 4-step run (a checkpoint every 2 steps) to resume, refuse, evaluate and damage copies of."""
    out = tmp_path_factory.mktemp("run4") / "out"
    assert _train(tiny_dir, data, out, "--max-steps", "4", "--save-every", "2") == 0
    return out


def test_output_with_an_earlier_run_needs_resume_or_overwrite(tiny_dir, data, run4, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(run4, out)
    assert _train(tiny_dir, data, out, "--max-steps", "2", "--max-seq-length", "24") == 2
    assert "holds an earlier run" in _err(capsys) and (out / "checkpoint-4").is_dir()
    assert _train(tiny_dir, data, out, "--max-steps", "2", "--overwrite") == 0
    assert not (out / "checkpoint-4").exists() and (out / "checkpoint-2").is_dir()
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_already_past_max_steps(tiny_dir, data, run4, capsys):
    assert _train(tiny_dir, data, run4, "--max-steps", "3", "--save-every", "2", "--resume") == 2
    assert "already at step 4" in _err(capsys)


@pytest.mark.parametrize("victim", ["trainer_state.pt", "adapter_model.safetensors"])
def test_resume_from_a_truncated_checkpoint(victim, tiny_dir, data, run4, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(run4, out)
    path = out / "checkpoint-4" / victim
    path.write_bytes(path.read_bytes()[:100])
    assert _train(tiny_dir, data, out, "--max-steps", "6", "--save-every", "2", "--resume") == 2
    assert "is damaged" in _err(capsys)


class _Killed(BaseException):
    """Stands for kill -9: nothing in fastllm catches it."""


def test_a_crash_mid_save_resumes_from_the_last_whole_checkpoint(tiny_dir, data, run4, tmp_path, monkeypatch):
    """Killed between the adapter write and the state write of step 4: resume runs from step 2, exactly."""
    out = tmp_path / "out"
    real_save = torch.save

    def save(obj, path, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise _Killed
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(_Killed):
        _train(tiny_dir, data, out, "--max-steps", "4", "--save-every", "2")
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    (out / "adapter_model.safetensors.tmp").write_bytes(b"half")  # a killed adapter copy
    assert _train(tiny_dir, data, out, "--max-steps", "4", "--save-every", "2", "--resume") == 0
    summary = json.loads((out / "run_summary.json").read_text())
    ref = json.loads((run4 / "run_summary.json").read_text())
    assert summary["resumed_from_step"] == 2
    torch.testing.assert_close(torch.tensor(summary["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-4)
    assert not any(p.name.startswith(".tmp-") or p.name.endswith(".tmp") for p in out.iterdir())


def test_read_only_results_and_missing_adapter(tiny_dir, data, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("")
    results.chmod(0o444)
    if os.access(results, os.W_OK):
        pytest.skip("running as a user who can write read-only files (root)")
    assert _train(tiny_dir, data, tmp_path / "out", "--max-steps", "1", "--results", str(results)) == 2
    assert "cannot write --results" in _err(capsys)


def test_eval_with_a_missing_adapter(tiny_dir, data, tmp_path, capsys):
    argv = ["eval", "--model", tiny_dir, "--data", data, "--max-seq-length", "32", "--eval-blocks", "2"]
    assert main([*argv, "--adapter", str(tmp_path / "nothing")]) == 2
    assert "not a PEFT adapter directory" in _err(capsys)


def test_results_directory_is_refused(tiny_dir, data, tmp_path, capsys):
    assert _train(tiny_dir, data, tmp_path / "out", "--max-steps", "1", "--results", str(tmp_path)) == 2
    assert "cannot write --results" in _err(capsys)


def test_model_dir_without_weights(tiny_dir, data, tmp_path, capsys):
    model = tmp_path / "noweights"
    shutil.copytree(tiny_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    assert main(["train", "--model", str(model), "--data", data, *FAST, "--output", str(tmp_path / "o")]) == 2
    assert "no weights" in _err(capsys)


def test_short_max_seq_length_still_samples(tiny_dir, data, tmp_path):
    """The sample after training fits the patched length limit (prompt cut, fewer new tokens)."""
    assert main(["train", "--model", tiny_dir, "--data", data, "--max-seq-length", "8", "--eval-blocks", "2",
                 "--lora-r", "4", "--max-steps", "1", "--prompt", WORDS, "--output", str(tmp_path / "o")]) == 0


def _wait_for(proc, path, lines: int, limit: float = 900) -> None:
    """Until ``path`` has ``lines`` lines or the process ended: an observable event, not a guess of the speed."""
    deadline = time.time() + limit  # only against a hang; a slow machine just takes longer
    while proc.poll() is None and time.time() < deadline:
        if path.is_file() and path.read_text().count("\n") >= lines:
            return
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_a_whole_checkpoint(sig, tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastllm.cli", "train", "--model", tiny_dir, "--data", data, *FAST,
           "--max-steps", "100000", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(proc, out / "train_log.jsonl", 2)
    assert proc.poll() is None, proc.communicate()[0][-2000:]
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 130 and "interrupted at step" in output, output[-2000:]
    (ckpt,) = out.glob("checkpoint-*")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    logged = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert state["step"] == logged[-1] == int(ckpt.name.split("-")[1]) >= 2
    assert (out / "adapter_model.safetensors").is_file()


def _write_gguf(path, model_dir):
    """The tiny Llama and its tokenizer as an F32 GGUF file (what llama.cpp's converter writes, minus quantizing)."""
    import gguf
    from safetensors.torch import load_file

    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    tk = json.loads(_tokenizer().backend_tokenizer.to_str())
    vocab = sorted(tk["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), 320)]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_context_length, 2048), (w.add_embedding_length, 64), (w.add_block_count, 2),
                   (w.add_feed_forward_length, 160), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                   (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_dimension_count, 16), (w.add_vocab_size, 320)):
        add(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tk["model"]["merges"]])
    w.add_eos_token_id(0)
    w.add_chat_template(CHATML)
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in sd.items():
        if name not in names:
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            names[name] = f"blk.{i}.{parts[rest]}.weight"
        w.add_tensor(names[name], t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def gguf_model(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("FASTLLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, tiny_llama_dir)
    return path


def _cache_model(tmp_path):
    (cache,) = (tmp_path / "cache").glob("tiny-bf16-*")
    return cache / "model.safetensors"


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "no_config"])
def test_a_damaged_gguf_cache_is_rebuilt(damage, gguf_model, data, tmp_path):
    from safetensors.torch import load_file

    assert main(["eval", "--model", str(gguf_model), "--data", data, "--max-seq-length", "32", "--eval-blocks",
                 "2"]) == 0
    weights = _cache_model(tmp_path)
    good = {k: v.clone() for k, v in load_file(weights).items()}  # load_file maps the file: copy first
    if damage == "zeroed":
        weights.write_bytes(bytes(weights.stat().st_size))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        os.remove(weights.parent / "config.json")
    assert main(["eval", "--model", str(gguf_model), "--data", data, "--max-seq-length", "32", "--eval-blocks",
                 "2"]) == 0
    for name, t in load_file(_cache_model(tmp_path)).items():
        assert torch.equal(t, good[name]), name


@pytest.mark.parametrize("damage, hint", [("truncated", "truncated"), ("noise", "is damaged")])
def test_a_damaged_gguf_is_refused(damage, hint, gguf_model, data, tmp_path, capsys):
    raw = bytearray(gguf_model.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) * 2 // 3]
    else:  # random bytes mid-file (in the tensor data)
        mid = len(raw) // 2
        raw[mid:mid + 20000] = torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(0),
                                             dtype=torch.uint8).numpy().tobytes()
    gguf_model.write_bytes(bytes(raw))
    assert main(["eval", "--model", str(gguf_model), "--data", data, "--max-seq-length", "32", "--eval-blocks",
                 "2"]) == 2
    assert hint in _err(capsys)
