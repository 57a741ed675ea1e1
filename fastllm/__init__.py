"""fastllm: faster, lighter QLoRA / LoRA fine-tuning of Llama, Mistral and Qwen models, drop-in.

Importing fastllm patches nothing and prints nothing: ``FastLlama.from_pretrained`` and ``patch`` do.
"""

from .config import PatchConfig
from .loader import DEFAULT, FastLlama, FastModel
from .patching import CompileReport, PatchReport, compile_report, eager, is_patched, patch, patch_report, unpatch

__version__ = "0.1.0"

__all__ = ["CompileReport", "DEFAULT", "FastLlama", "FastModel", "PatchConfig", "PatchReport", "compile_report",
           "eager", "is_patched", "patch", "patch_report", "unpatch", "__version__"]
