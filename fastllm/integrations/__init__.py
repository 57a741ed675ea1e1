"""Glue with PEFT, gradient checkpointing, FSDP2 and trainers."""
