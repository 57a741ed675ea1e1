"""Training text: load it (the embedded default or a local file), split it, and pack it into token blocks.

A local file may be ``.txt`` (one document a paragraph), ``.json`` (a list) or ``.jsonl`` / ``.ndjson`` (any
case); each record is a string, ``{"text": ...}``, or a chat: ``{"messages": [{"role", "content"}, ...]}`` or
ShareGPT's ``{"conversations": [{"from", "value"}, ...]}``, formatted with the tokenizer's chat template.
Anything else raises ``DataError`` naming the file, the record and the fix.
"""

from __future__ import annotations

import json
import os
import random

import torch

from . import defaults

CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speaker names, mapped as TRL maps them
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}
JSONL_EXTS = (".jsonl", ".ndjson")


class DataError(ValueError):
    """A training data file that cannot be used; the message names the file and the fix."""


def _chat_messages(rec: dict, where: str) -> list[dict]:
    if "messages" in rec:
        chat, role_key, text_key, roles = rec["messages"], "role", "content", {r: r for r in CHAT_ROLES}
    else:
        chat, role_key, text_key, roles = rec["conversations"], "from", "value", SHAREGPT_ROLES
        if chat and isinstance(chat[0], dict) and "role" in chat[0]:  # "conversations" in the messages shape
            role_key, text_key, roles = "role", "content", {r: r for r in CHAT_ROLES}
    if not isinstance(chat, list) or not chat:
        raise DataError(f"{where}: a chat must be a non-empty list of messages")
    out = []
    for i, m in enumerate(chat):
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise DataError(f"{where}: message {i} needs {role_key!r} and {text_key!r}, got {str(m)[:80]!r}")
        if m[role_key] not in roles:
            raise DataError(f"{where}: message {i} has unknown role {m[role_key]!r}; use one of {sorted(roles)}")
        if not isinstance(m[text_key], str):
            raise DataError(f"{where}: message {i} {text_key!r} must be a string, got {m[text_key]!r:.40}")
        out.append({"role": roles[m[role_key]], "content": m[text_key]})
    return out


def _record_text(rec, tokenizer, where: str = "record") -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        if "text" in rec:
            if not isinstance(rec["text"], str):
                raise DataError(f"{where}: 'text' must be a string, got {rec['text']!r:.40}; fix or drop the record")
            return rec["text"]
        if "messages" in rec or "conversations" in rec:
            chat = _chat_messages(rec, where)
            if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
                raise DataError(f"{where}: chat records need a tokenizer with a chat template")
            return tokenizer.apply_chat_template(chat, tokenize=False)
    raise DataError(f"{where}: cannot read a training record of this shape: {str(rec)[:120]!r}; use a string, "
                    "{'text': ...}, {'messages': [{'role', 'content'}]} or {'conversations': [{'from', 'value'}]}")


def _read_text(path: str) -> str:
    """The file as text: refuses directories, empty, binary and non-UTF-8 files; drops a UTF-8 BOM."""
    if os.path.isdir(path):
        raise DataError(f"--data {path!r} is a directory; pass a .txt, .json or .jsonl file")
    if not os.path.isfile(path):
        raise DataError(f"no such data file: {path!r} (use a .txt, .json or .jsonl file, or no --data "
                        "for the embedded default)")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError(f"data file {path} is empty; put some text in it")
    if b"\0" in raw[:65536]:
        raise DataError(f"data file {path} looks binary (it holds NUL bytes); pass a text file")
    try:
        return raw.decode("utf-8-sig")  # -sig: accept (and drop) the BOM some editors write
    except UnicodeDecodeError as err:
        raise DataError(f"data file {path} is not UTF-8 (bad byte at offset {err.start}); "
                        "re-save it as UTF-8") from None


def _json_records(path: str, text: str) -> list:
    if path.lower().endswith(JSONL_EXTS):
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {n} is not valid JSON ({err.msg} at column {err.colno}); "
                                    "fix or remove that line") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                        "for one record a line, name the file .jsonl") from None
    if isinstance(records, dict):
        records = records.get("data") or records.get("train") or [records]
    return records if isinstance(records, list) else [records]


def load_texts(path: str | None = None, tokenizer=None) -> list[str]:
    """The documents of ``path`` (or of the embedded default: the King James Bible, one verse each)."""
    if path is None:
        return defaults.default_texts()
    text = _read_text(path)
    if path.lower().endswith((".json", *JSONL_EXTS)):
        records = _json_records(path, text)
        texts = [_record_text(r, tokenizer, f"{path} record {i + 1}") for i, r in enumerate(records)]
    else:
        texts = [p.strip() for p in text.split("\n\n") if p.strip()]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{path} holds no text")
    return texts


def chunk_texts(texts: list[str], max_chars: int) -> list[str]:
    """Cut documents longer than ``max_chars`` at whitespace, so one long paragraph or a huge single line
    still gives several documents to split into training and held-out parts."""
    out = []
    for t in texts:
        while len(t) > max_chars:
            cut = t.rfind(" ", max_chars // 2, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(t[:cut])
            t = t[cut:]
        out.append(t)
    return out


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
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be at least 1, got {max_blocks}")
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
            raise DataError(f"not enough text to train or evaluate on ({len(ids)} tokens)")
        return torch.tensor(ids, dtype=torch.long)[None]  # one short block (1, len) for a tiny text
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (n_blocks, seq_len)
