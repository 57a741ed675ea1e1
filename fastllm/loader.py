"""``FastLlama``: load a Llama checkpoint (4-bit NF4 or 16-bit), patch it, and add LoRA adapters.

Orchestration only: each step is a short function; the patching itself lives in ``fastllm.patching``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

import torch
from torch import nn

from . import defaults
from ._compat import (
    SUPPORTED_DTYPES,
    SUPPORTED_MODEL_TYPES,
    bf16_supported,
    bnb,
    enable_hf_checkpointing,
    hub_kernels_switch,
)
from .arch import arch_of, peft_targets
from .arch.llama import LLAMA
from .checksums import sha256_file
from .config import PatchConfig
from .patching import find_base, patch_config, unpatch
from .patching import patch as apply_patch

logger = logging.getLogger("fastllm")

DEFAULT = defaults.DEFAULT_MODEL
LLAMA_LINEARS = LLAMA.lora_targets  # every architecture's default today; each entry names its own (``Arch``)
_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if bf16_supported(device) else torch.float16
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}")
        dtype = _DTYPE_NAMES[dtype]
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; use torch.bfloat16, torch.float16 or torch.float32")
    return dtype


def _target_device(device_map) -> torch.device:
    if device_map is None:
        if torch.cuda.is_available():
            # Under torchrun each rank loads onto its own GPU.
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return torch.device("cpu")
    if isinstance(device_map, (str, torch.device, int)) and str(device_map) not in ("auto", "balanced"):
        return torch.device(device_map) if not isinstance(device_map, int) else torch.device("cuda", device_map)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _split_gguf(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(directory or id, gguf file name or None)."""
    if name_or_path == DEFAULT:
        path = defaults.default_model_gguf()
        return os.path.dirname(path), os.path.basename(path)
    if gguf_file is None and str(name_or_path).endswith(".gguf"):
        return os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)
    return name_or_path, gguf_file


def _check_exists(path: str, gguf_file: str | None) -> None:
    if gguf_file is not None:
        full = os.path.join(path, gguf_file)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"GGUF file not found: {full}")
        return
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face checkpoint directory, a "
                                    f".gguf file, or nothing for the embedded default ({DEFAULT})")
        return
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"no such checkpoint: {path!r}; pass a Hugging Face checkpoint directory, a "
                                f".gguf file, or nothing for the embedded default ({DEFAULT})")


def _check_model_type(path: str, gguf_file: str | None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, gguf_file=gguf_file) if gguf_file else AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"fastllm supports model_type {SUPPORTED_MODEL_TYPES}; {path} is "
                         f"{config.model_type!r}. Load it with plain transformers instead.")
    return config


def _gguf_cache_dir(path: str, gguf_file: str) -> str:
    st = os.stat(os.path.join(path, gguf_file))
    key = hashlib.sha1(f"{os.path.abspath(os.path.join(path, gguf_file))}:{st.st_size}:{st.st_mtime_ns}"
                       .encode()).hexdigest()[:12]
    return os.path.join(defaults.cache_dir(), f"{os.path.splitext(gguf_file)[0]}-bf16-{key}")


def _check_gguf_whole(file: str) -> None:
    """A truncated or cut GGUF fails here with a message, not deep in transformers' reader. The ``gguf`` package
    reads every tensor type (transformers' own header reader of 5.1x does not know Q4_1)."""
    from gguf import GGUFReader

    size = os.path.getsize(file)
    try:
        tensors = GGUFReader(file).tensors
    except Exception as err:  # struct/numpy errors of a cut header or data: all mean the same to the user
        raise ValueError(f"{file} is not a readable GGUF file ({type(err).__name__}: {err}); it is truncated or "
                         "damaged: download it again") from None
    need = max((t.data_offset + t.n_bytes for t in tensors), default=0)
    if need > size:
        raise ValueError(f"{file} is truncated: its tensors need {need} bytes, the file has {size}; "
                         "download it again")


CACHE_MANIFEST = "fastllm-cache.json"


def _cache_ok(out: str) -> bool:
    """The cache is complete and unchanged: its manifest (written last) matches every file's SHA-256."""
    try:
        with open(os.path.join(out, CACHE_MANIFEST)) as f:
            sums = json.load(f)["sha256"]
        return bool(sums) and all(sha256_file(os.path.join(out, n)) == d for n, d in sums.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_weights(model: nn.Module, gguf_file: str) -> None:
    """Dequantized weights of a damaged file: non-finite values, or a matrix that is all zeros."""
    for name, t in model.state_dict().items():
        if not torch.is_floating_point(t):
            continue
        if not bool(torch.isfinite(t).all()) or (t.dim() == 2 and not bool(t.any())):
            raise ValueError(f"{gguf_file} is damaged: its tensor {name} dequantizes to "
                             f"{'non-finite values' if not bool(torch.isfinite(t).all()) else 'all zeros'}; "
                             "download the file again")


def convert_gguf(path: str, gguf_file: str) -> str:
    """Dequantize a GGUF checkpoint once into a bf16 safetensors directory (cached); returns that directory.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model until its quantizer and the config's
    ``quantization_config`` are dropped. The directory is written beside and renamed into place, with a
    manifest of its files' SHA-256 written last; a cache that fails that check (a file zeroed, truncated or
    missing) is rebuilt. The dequantized weights are checked (finite, no all-zero matrix) before saving.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _gguf_cache_dir(path, gguf_file)
    if _cache_ok(out):
        return out
    logger.info("fastllm: converting %s to a bf16 checkpoint in %s (once)", gguf_file, out)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.bfloat16)
    _check_weights(model, os.path.join(path, gguf_file))
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sums = {n: sha256_file(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, CACHE_MANIFEST), "w") as f:
            json.dump({"source": gguf_file, "sha256": sums}, f, indent=1)
        if os.path.exists(out):  # a damaged cache: move it aside (a rename cannot replace a non-empty dir)
            os.replace(out, os.path.join(tmp, ".damaged"))
        os.replace(tmp, out)
        shutil.rmtree(os.path.join(out, ".damaged"), ignore_errors=True)
    except OSError:
        if not _cache_ok(out):  # another process may have won the race with a good cache
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _quant_config(dtype: torch.dtype, keep_16bit: tuple = ()):
    """NF4 with double quant; ``keep_16bit``: submodule names left unquantized besides the head (the skip list
    replaces transformers' default one, which is the output head)."""
    from transformers import BitsAndBytesConfig

    if bnb() is None:
        raise ImportError("load_in_4bit=True needs bitsandbytes: pip install bitsandbytes")
    skip = {"llm_int8_skip_modules": ["lm_head", *keep_16bit]} if keep_16bit else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, **skip)


def _fix_bnb_cpu(model: nn.Module) -> int:
    """Stop bitsandbytes' AVX512-BF16 CPU path from repacking 4-bit weights on an eval forward.

    On such CPUs an eval/no-grad forward rewrites the weight into an inference-only layout that
    ``.train()`` never undoes; gradients through the frozen layers are then ~10x too small.
    """
    n = 0
    b = bnb()
    for m in model.modules():
        if b is not None and isinstance(m, b.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _load_tokenizer(path: str, max_seq_length: int):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        logger.info("fastllm: no tokenizer in %s (%s); returning None", path, err)
        return None
    tokenizer.model_max_length = max_seq_length
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class FastModel:
    """Load, patch and LoRA-wrap a model of any architecture in ``fastllm.arch`` (see the README for the API)."""

    @staticmethod
    def from_pretrained(name_or_path: str = DEFAULT, *, load_in_4bit: bool = True, max_seq_length: int = 2048,
                        dtype=None, device_map=None, gguf_file: str | None = None,
                        patch: bool | PatchConfig = True, **kwargs):
        """Returns ``(model, tokenizer)``; tokenizer is None when the checkpoint has none.

        ``name_or_path``: a local Hugging Face checkpoint directory, a ``.gguf`` file (or a directory with
        ``gguf_file=``), or the embedded default. ``load_in_4bit`` means bitsandbytes NF4 with double quant
        and ``dtype`` compute (bf16, fp16 where bf16 is unsupported). ``patch``: True, False or a PatchConfig.
        Extra ``kwargs`` go to transformers' ``from_pretrained``.
        """
        from transformers import AutoModelForCausalLM

        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1:
            raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")
        if not isinstance(patch, (bool, PatchConfig)):
            raise TypeError(f"patch must be True, False or a fastllm.PatchConfig, got {type(patch).__name__}")
        device = _target_device(device_map)
        dtype = _resolve_dtype(dtype, device)
        path, gguf = _split_gguf(str(name_or_path), gguf_file)
        _check_exists(path, gguf)
        if gguf is not None:
            _check_gguf_whole(os.path.join(path, gguf))
        elif os.path.isdir(path) and not any(n.endswith((".safetensors", ".bin")) for n in os.listdir(path)):
            raise FileNotFoundError(f"{path} has a config.json but no weights (model.safetensors or "
                                    "pytorch_model.bin); copy the checkpoint's weight files into it")
        config = _check_model_type(path, gguf)
        if gguf is not None:
            path = convert_gguf(path, gguf)
        limit = getattr(config.get_text_config(), "max_position_embeddings", max_seq_length)
        if max_seq_length > limit:
            logger.warning("fastllm: max_seq_length=%d is over the model's max_position_embeddings=%d",
                           max_seq_length, limit)
        load_kwargs = dict(dtype=dtype, **kwargs)
        if patch is not False and hub_kernels_switch():
            # transformers' hub kernels replace the forwards fastllm patches (and fetch kernels from the Hub,
            # which an offline machine cannot): a patched model does without them; patch() would turn them off.
            load_kwargs.setdefault("use_kernels", False)
        if load_in_4bit:
            load_kwargs["quantization_config"] = _quant_config(dtype, arch_of(config.model_type).keep_16bit)
        if device.type == "cuda":
            load_kwargs["device_map"] = {"": device} if device_map is None else device_map
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
        _fix_bnb_cpu(model)
        tokenizer = _load_tokenizer(path, max_seq_length)
        if patch is not False:
            cfg = patch if isinstance(patch, PatchConfig) else PatchConfig()
            if cfg.max_seq_length is None:
                cfg = cfg.replace(max_seq_length=max_seq_length)
            apply_patch(model, cfg)
        return model, tokenizer

    @staticmethod
    def get_peft_model(model: nn.Module, r: int = 16, lora_alpha: int = 16, lora_dropout: float = 0.0,
                       target_modules=None, use_gradient_checkpointing: bool | str = "auto",
                       memory_budget: float | None = None, **lora_kwargs):
        """Wrap ``model`` in a normal ``peft.PeftModel`` with LoRA on ``target_modules`` (default: the
        architecture's table entry, every linear of a decoder layer).

        ``use_gradient_checkpointing``: "auto" (the default: per decoder layer, keep its activations, recompute it
        or offload its input, the fastest mix under ``memory_budget`` GiB, by default what the device can give;
        ``patch_report(model)`` shows the choice; on an unpatched model it means True), True (non-reentrant
        recompute of every layer), "offload" (checkpointed inputs in pinned CPU memory; needs a fastllm-patched
        model), or False. Unlike PEFT's ``prepare_model_for_kbit_training``,
        nothing is cast to fp32: non-reentrant checkpointing needs no input gradients.
        """
        import peft
        from peft.tuners.tuners_utils import BaseTunerLayer

        base = find_base(model)
        if isinstance(model, peft.PeftModel):
            raise ValueError("model already has LoRA adapters; add another with model.add_adapter(name, config)")
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            # An earlier get_peft_model put its LoRA layers into this very model: wrapping it again would
            # re-initialise that PeftModel's (maybe trained) adapter weights.
            raise ValueError("this base model is already wrapped by an earlier get_peft_model (its layers hold "
                             "LoRA adapters): use that PeftModel, or load a fresh base model with from_pretrained")
        if not (any(use_gradient_checkpointing is v for v in (True, False))
                or use_gradient_checkpointing in ("offload", "auto")):
            raise ValueError(f"use_gradient_checkpointing must be 'auto', True, False or 'offload', "
                             f"got {use_gradient_checkpointing!r}")
        if memory_budget is not None and use_gradient_checkpointing != "auto":
            raise ValueError(f"memory_budget applies to use_gradient_checkpointing='auto', got "
                             f"{use_gradient_checkpointing!r}: drop memory_budget or pass 'auto'")
        if target_modules is None:
            target_modules = arch_of(base.config.model_type).lora_targets
        lora_kwargs.setdefault("task_type", "CAUSAL_LM")
        lora_kwargs.setdefault("bias", "none")
        config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                 target_modules=peft_targets(target_modules), **lora_kwargs)
        current = patch_config(base)
        if use_gradient_checkpointing == "offload" and current is None:
            raise ValueError("use_gradient_checkpointing='offload' needs a fastllm-patched model: load it with "
                             "FastLlama.from_pretrained(..., patch=True) or call fastllm.patch(model) first")
        peft_model = peft.get_peft_model(model, config)
        if use_gradient_checkpointing:
            enable_hf_checkpointing(base)
        if current is not None:
            # Patch again over the PEFT wrapper (unpatching first: patching with an unchanged config is a
            # no-op): the lora patches need its LoRA layers, and checkpointing follows the argument (False:
            # whatever the patched config said).
            gc = use_gradient_checkpointing if use_gradient_checkpointing else current.gradient_checkpointing
            unpatch(peft_model)
            budget = memory_budget if memory_budget is not None else current.memory_budget
            apply_patch(peft_model, current.replace(gradient_checkpointing=gc, memory_budget=budget))
        return peft_model


class FastLlama(FastModel):
    """``FastModel`` under the Llama name (the same methods)."""
