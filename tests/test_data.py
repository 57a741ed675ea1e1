"""Training text: default, local files (txt / json / jsonl, chat records), split and packing."""

import json

import pytest
import torch

from fastllm.data import DataError, load_texts, pack, split_texts


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_default_text_is_the_kjv():
    texts = load_texts(None)
    assert len(texts) > 31000 and texts[0].startswith("In the beginning God created")


def test_split_is_fixed_and_disjoint():
    texts = [f"verse {i}" for i in range(1000)]
    a_train, a_held = split_texts(texts, seed=0)
    b_train, b_held = split_texts(texts, seed=0)
    assert a_held == b_held and len(a_held) == 20 and not set(a_held) & set(a_train)
    assert split_texts(texts, seed=1)[1] != a_held


def test_local_files_and_chat_records(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    (tmp_path / "b.json").write_text(json.dumps([{"text": "one"}, "two"]))
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps({"text": "plain"}) + "\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first paragraph", "second paragraph"]
    assert load_texts(str(tmp_path / "b.json")) == ["one", "two"]
    c = load_texts(str(tmp_path / "c.jsonl"), tok)
    assert "<|im_start|>assistant" in c[0] and c[1] == "plain"
    with pytest.raises(DataError, match="no such data file"):
        load_texts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": 1}) + "\n")
    with pytest.raises(ValueError, match="cannot read a training record"):
        load_texts(str(tmp_path / "d.jsonl"), tok)


def test_pack_blocks_and_short_text(tok):
    blocks = pack(tok, ["In the beginning God created the heaven and the earth."] * 20, 16)
    assert blocks.dtype == torch.long and blocks.shape[1] == 16 and blocks.shape[0] >= 5
    assert int((blocks == tok.eos_token_id).sum()) >= 5  # EOS between documents
    short = pack(tok, ["Jesus wept."], 64)
    assert short.shape[0] == 1 and 2 <= short.shape[1] < 64
    assert pack(tok, ["a b c d e f g h"] * 50, 8, max_blocks=3).shape == (3, 8)
