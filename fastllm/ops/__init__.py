"""Layer 2: autograd Functions and functional wrappers, each with a pure-torch fallback."""

from .rms_norm import rms_norm
from .swiglu import swiglu

__all__ = ["rms_norm", "swiglu"]
