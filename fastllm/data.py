"""Training text: load it (the embedded default or a local file), split it, and pack it into token blocks.

A local file may be ``.txt`` (one document a paragraph), ``.json`` (a list) or ``.jsonl``; each record is a
string, ``{"text": ...}``, or a chat (``{"messages": [{"role", "content"}, ...]}`` or ``conversations``),
which is formatted with the tokenizer's chat template.
"""

from __future__ import annotations

import json
import os
import random

import torch

from . import defaults


def _record_text(rec, tokenizer) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        if "text" in rec:
            return str(rec["text"])
        chat = rec.get("messages") or rec.get("conversations")
        if chat is not None:
            if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("chat records need a tokenizer with a chat template")
            return tokenizer.apply_chat_template(chat, tokenize=False)
    raise ValueError(f"cannot read a training record of this shape: {str(rec)[:120]!r}; use a string, "
                     "{'text': ...} or {'messages': [...]}")


def load_texts(path: str | None = None, tokenizer=None) -> list[str]:
    """The documents of ``path`` (or of the embedded default: the King James Bible, one verse each)."""
    if path is None:
        return defaults.default_texts()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path!r} (use a .txt, .json or .jsonl file, or no --data "
                                "for the embedded default)")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in f if line.strip()]
        elif path.endswith(".json"):
            records = json.load(f)
            if isinstance(records, dict):
                records = records.get("data") or records.get("train") or [records]
        else:
            records = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    texts = [_record_text(r, tokenizer) for r in records]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def split_texts(texts: list[str], holdout: float = 0.02, seed: int = 0) -> tuple[list[str], list[str]]:
    """A fixed-seed held-out split that keeps each part in its original order."""
    idx = list(range(len(texts)))
    n_hold = max(1, int(len(texts) * holdout)) if len(texts) > 1 else 0
    held = set(random.Random(seed).sample(idx, n_hold))
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def pack(tokenizer, texts: list[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate tokenized texts (EOS between them) and cut into (n_blocks, seq_len) token blocks.

    A text shorter than one block gives a single (1, n_tokens) block rather than nothing.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for start in range(0, len(texts), 1024):
        # verbose=False: documents longer than model_max_length are expected here; blocks cut them anyway
        batch = tokenizer(texts[start:start + 1024], add_special_tokens=False, verbose=False)["input_ids"]
        for seq in batch:
            ids.extend(seq)
            if eos is not None:
                ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        if len(ids) < 2:
            raise ValueError(f"not enough text to train or evaluate on ({len(ids)} tokens)")
        return torch.tensor(ids, dtype=torch.long)[None]  # one short block (1, len) for a tiny text
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (n_blocks, seq_len)
