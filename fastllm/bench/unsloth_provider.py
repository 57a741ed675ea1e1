"""The ``unsloth`` provider of ``fastllm bench train``: Unsloth's own QLoRA recipe on the same random model.

Unsloth only loads checkpoints, so the model ``models.build_qlora_base`` builds (same shape, seed 0, NF4 double
quant) is saved once, pre-quantized, to ``/tmp/fastllm-unsloth-<shape>`` and reused. A child process writes it,
one that never imports Unsloth: Unsloth patches transformers at import, and may change how a random model is
initialised. Transformers loads the packed NF4 weights as they are (no re-quantization), so the base weights are
the same bytes as every other provider's; a fingerprint saved beside them is checked after Unsloth's load and the
result goes into the row's ``setup``.

Needs ``examples/unsloth_env.sh`` (``$UNSLOTH_SITE``, put first on the worker's PYTHONPATH by ``train.spawn_worker``:
Unsloth pins trl<=1.15). Stage messages go to stderr, whose last lines become the row's ``error`` on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

from .models import build_qlora_base, lora_targets

FINGERPRINT = "fastllm_fingerprint.json"


def _say(msg: str) -> None:
    print(f"unsloth provider: {msg}", file=sys.stderr, flush=True)


def checkpoint_dir(shape: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"fastllm-unsloth-{shape}")


def fingerprint(model) -> dict:
    """Exact integer sums of the packed NF4 bytes, their absmax and the input embedding's bf16 bits; 4-bit linears
    holding a plain (unquantized) weight are counted apart, so a loader that leaves some unpacked shows as a
    difference rather than a crash."""
    import bitsandbytes as bnb

    packed = absmax = n = unpacked = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = getattr(m.weight, "quant_state", None)
            if qs is None:
                unpacked += 1
                continue
            packed += int(m.weight.data.view(torch.uint8).to(torch.int64).sum())
            absmax += int(qs.absmax.view(torch.uint8).to(torch.int64).sum())  # uint8 under double quant
            n += 1
    emb = model.get_input_embeddings().weight.data
    return {"nf4_linears": n, "unpacked_4bit_linears": unpacked, "packed": packed, "absmax": absmax,
            "embed": int(emb.view(torch.int16).to(torch.int64).sum()), "vocab": emb.shape[0]}


def _tokenizer():
    """A tiny word-level tokenizer: the benchmark feeds random ids, Unsloth only needs one to load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=131072)


def save_checkpoint(shape: str, device: str, path: str) -> None:
    """Write build_qlora_base's model, pre-quantized, plus a tokenizer and its fingerprint, to ``path``."""
    from transformers import BitsAndBytesConfig

    from ..arch import arch_of

    model = build_qlora_base(shape, torch.device(device))
    # build_qlora_base swaps the linears by hand; this is what tells from_pretrained they are packed NF4 (and which
    # modules, a vision tower's, stay 16-bit)
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=list(arch_of(model.config.model_type).keep_16bit)
        or None)
    tmp = path + ".partial"  # renamed when complete, so a killed run never leaves a checkpoint to reuse
    model.save_pretrained(tmp)
    _tokenizer().save_pretrained(tmp)
    with open(os.path.join(tmp, FINGERPRINT), "w") as f:
        json.dump(fingerprint(model), f)
    os.replace(tmp, path)


def _ensure_checkpoint(shape: str, dev: torch.device) -> str:
    path = checkpoint_dir(shape)
    if os.path.isfile(os.path.join(path, FINGERPRINT)):
        _say(f"reusing checkpoint {path}")
        return path
    _say(f"saving the {shape} model pre-quantized to {path} (child process, no Unsloth)")
    proc = subprocess.run([sys.executable, "-m", "fastllm.bench.unsloth_provider", shape, str(dev), path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"unsloth provider: saving the checkpoint failed: {tail}")
    return path


def build(shape: str, dev: torch.device, seq: int, gc: bool = True, compile: bool = True):
    """Unsloth's FastLanguageModel + LoRA (r=16 on the 7 linears), as ``train._prepare`` returns: (model, note).
    ``compile=False`` (provider ``unsloth:compile=0``) sets ``UNSLOTH_COMPILE_DISABLE=1`` before Unsloth is
    imported: its eager path, for shapes where its torch.compile'd one fails."""
    stage = ["saving the checkpoint"]
    if not compile:
        os.environ["UNSLOTH_COMPILE_DISABLE"] = "1"
    try:
        return _build(shape, dev, seq, gc, stage)
    except Exception as e:  # the row's error keeps the last stderr lines: name the stage there
        raise RuntimeError(f"unsloth provider failed while {stage[0]}: {type(e).__name__}: {e}") from e


def _build(shape: str, dev: torch.device, seq: int, gc: bool, stage: list):
    path = _ensure_checkpoint(shape, dev)
    stage[0] = "importing unsloth"
    _say(stage[0])
    # before transformers and peft are imported in this process: Unsloth patches them at import
    from unsloth import FastLanguageModel

    stage[0] = f"loading {path} with FastLanguageModel.from_pretrained"
    _say(stage[0])
    model, _ = FastLanguageModel.from_pretrained(
        path, max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=True, fix_tokenizer=False,
        offload_embedding=False)  # keep the embedding on the GPU, as every other provider does
    with open(os.path.join(path, FINGERPRINT)) as f:
        saved = json.load(f)
    stage[0] = "fingerprinting the loaded weights"
    loaded = fingerprint(model)
    same = "same weights as the fastllm build" if loaded == saved else f"WEIGHTS DIFFER: {saved} vs {loaded}"
    stage[0] = f"FastLanguageModel.get_peft_model ({same})"
    _say(stage[0])
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0, bias="none", target_modules=lora_targets(model),
        use_gradient_checkpointing="unsloth" if gc else False, random_state=0, max_seq_length=seq)
    import unsloth

    _say("timing")
    compiled = "" if os.environ.get("UNSLOTH_COMPILE_DISABLE") != "1" else ", UNSLOTH_COMPILE_DISABLE=1"
    return model, f"unsloth {unsloth.__version__} FastLanguageModel, checkpointing 'unsloth'{compiled}; {same}"


if __name__ == "__main__":  # python -m fastllm.bench.unsloth_provider SHAPE DEVICE PATH
    save_checkpoint(*sys.argv[1:4])
