"""Layer 3: replacement forwards with the same signatures as the transformers/bitsandbytes originals."""
