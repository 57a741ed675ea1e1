"""Layer 2: autograd Functions and functional wrappers, each with a pure-torch fallback."""

from .chunked_linear_loss import chunked_linear_loss, linear_log_probs
from .linear_cross_entropy import linear_cross_entropy
from .nf4 import dequantize_nf4, nf4_linear
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

__all__ = ["chunked_linear_loss", "dequantize_nf4", "linear_cross_entropy", "linear_log_probs", "nf4_linear",
           "rms_norm", "rope", "swiglu"]
