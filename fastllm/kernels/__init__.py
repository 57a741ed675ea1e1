"""Layer 1: Triton kernels and their host launchers (torch/triton imports only)."""
