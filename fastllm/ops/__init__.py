"""Layer 2: autograd Functions and functional wrappers, each with a pure-torch fallback."""

from .nf4 import dequantize_nf4, nf4_linear
from .rms_norm import rms_norm
from .swiglu import swiglu

__all__ = ["dequantize_nf4", "nf4_linear", "rms_norm", "swiglu"]
