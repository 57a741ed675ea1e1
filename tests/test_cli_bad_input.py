"""``fastllm train`` / ``eval`` on bad input and interruption: one line naming the fix and exit status 2 for bad
input, never a traceback or a silent run on garbage; checkpoints that survive Ctrl-C, SIGTERM and kill -9.

A tiny Llama with a tiny byte-level BPE tokenizer (and a tiny GGUF of both) keeps every run to seconds.
"""

import json
import shutil

import pytest

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
