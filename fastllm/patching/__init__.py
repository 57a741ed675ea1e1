"""Layer 4: the only code that mutates objects: patch specs, the registry, reports."""

from .api import eager, find_base, is_patched, patch, patch_config, patch_report, unpatch
from .compile_report import CompileReport, compile_report
from .report import PatchReport

__all__ = ["CompileReport", "PatchReport", "compile_report", "eager", "find_base", "is_patched", "patch",
           "patch_config", "patch_report", "unpatch"]
