"""A plain QLoRA training loop (what ``fastllm train`` runs), held-out perplexity and a sample."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    tokens_per_s: float
    seconds: float


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token loss) over ``blocks`` (n, T), token-weighted, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    dev = _device(model)
    try:
        for i in range(0, len(blocks), batch_size):
            x = blocks[i:i + batch_size].to(dev)
            out = model(input_ids=x, labels=x, use_cache=False)
            n = x.numel() - x.shape[0]  # shifted targets per block
            total += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def sample(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` (repetition-penalised), decoded."""
    was_training = model.training
    model.eval()
    try:
        enc = tokenizer(prompt, return_tensors="pt").to(_device(model))
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2,
                             pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def train(model: nn.Module, blocks: torch.Tensor, *, max_steps: int, batch_size: int = 2, grad_accum: int = 1,
          lr: float = 2e-4, seed: int = 0, progress: bool = True, on_step=None) -> TrainResult:
    """AdamW on the trainable (LoRA) parameters over shuffled ``blocks`` (n, T) for ``max_steps`` steps."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: wrap it with FastLlama.get_peft_model first")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=gen)
    dev = _device(model)
    model.train()
    losses: list[float] = []
    tokens, t0, cursor = 0, time.perf_counter(), 0
    bar = tqdm(range(max_steps), desc="train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        step_loss = 0.0
        for _ in range(grad_accum):
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(blocks), generator=gen), 0
            x = blocks[order[cursor:cursor + batch_size]].to(dev)
            cursor += batch_size
            loss = model(input_ids=x, labels=x, use_cache=False).loss / grad_accum
            loss.backward()
            step_loss += float(loss.detach())
            tokens += x.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        rate = tokens / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{rate:.0f}")
        if on_step is not None:
            on_step(step, step_loss)
    seconds = time.perf_counter() - t0
    return TrainResult(steps=max_steps, losses=losses, tokens_per_s=tokens / seconds, seconds=seconds)
