"""A plain QLoRA training loop (what ``fastllm train`` runs), with resumable state, plus evaluation helpers.

State saved by ``save_checkpoint`` (``<dir>/``): the PEFT adapter (``adapter_model.safetensors`` +
``adapter_config.json``) and ``trainer_state.pt`` (optimizer, step, losses, data order and cursor, RNG),
so ``train(..., resume_from=dir)`` continues exactly where a run stopped (also after Ctrl-C).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    tokens_per_s: float
    seconds: float
    interrupted: bool = False
    resumed_from_step: int = 0


@dataclass
class _LoopState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    order: torch.Tensor | None = None
    cursor: int = 0
    gen_state: torch.Tensor | None = None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    """AdamW in fp32 (``adamw``) or bitsandbytes' 8-bit (``adamw_8bit``) / paged 8-bit state."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token loss) over ``blocks`` (n, T), token-weighted, in eval mode."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    dev = _device(model)
    try:
        for i in tqdm(range(0, len(blocks), batch_size), desc="eval", disable=not progress, dynamic_ncols=True):
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


def save_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, state: _LoopState, path: str) -> None:
    """Adapter (PEFT format) + optimizer + loop state, written beside and renamed into place."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tmp = os.path.join(path, STATE_FILE + ".tmp")
    torch.save({"optimizer": opt.state_dict(), "step": state.step, "losses": state.losses, "order": state.order,
                "cursor": state.cursor, "gen_state": state.gen_state, "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, os.path.join(path, STATE_FILE))


def load_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> _LoopState:
    """Restore what ``save_checkpoint`` wrote into ``model`` (LoRA weights) and ``opt``."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"no training state to resume in {path} ({STATE_FILE} missing); "
                                "drop --resume to start a new run")
    weights = load_file(os.path.join(path, "adapter_model.safetensors"), device=str(_device(model)))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter in {path} does not match the model: unexpected {result.unexpected_keys[:3]}")
    saved = torch.load(state_path, weights_only=False)
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    return _LoopState(step=saved["step"], losses=list(saved["losses"]), order=saved["order"],
                      cursor=saved["cursor"], gen_state=saved["gen_state"])


def _next_batch(blocks: torch.Tensor, st: _LoopState, gen: torch.Generator, batch_size: int) -> torch.Tensor:
    if st.order is None or st.cursor + batch_size > len(st.order):
        st.order, st.cursor = torch.randperm(len(blocks), generator=gen), 0
    x = blocks[st.order[st.cursor:st.cursor + batch_size]]
    st.cursor += batch_size
    return x


def train(model: nn.Module, blocks: torch.Tensor, *, max_steps: int, batch_size: int = 2, grad_accum: int = 1,
          lr: float = 2e-4, optim: str = "adamw", seed: int = 0, progress: bool = True, on_step=None,
          resume_from: str | None = None, save_dir: str | None = None, save_every: int = 0,
          log_path: str | None = None) -> TrainResult:
    """Train the trainable (LoRA) parameters on shuffled ``blocks`` (n, T) up to ``max_steps`` steps.

    ``resume_from``: a directory written by ``save_checkpoint`` (continue from its step). ``save_dir``: where
    state is saved every ``save_every`` steps, at the end, and on Ctrl-C (then ``interrupted`` is True).
    ``log_path``: JSON lines, one per step (step, loss, tokens/s).
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: wrap it with FastLlama.get_peft_model first")
    opt = make_optimizer(params, optim, lr)
    gen = torch.Generator().manual_seed(seed)
    st = load_checkpoint(model, opt, resume_from) if resume_from else _LoopState()
    if st.gen_state is not None:
        gen.set_state(st.gen_state)
    start_step = st.step
    dev = _device(model)
    model.train()
    tokens, t0, interrupted = 0, time.perf_counter(), False
    log = open(log_path, "a") if log_path else None
    bar = tqdm(range(start_step, max_steps), desc="train", disable=not progress, dynamic_ncols=True,
               initial=start_step, total=max_steps)
    try:
        for step in bar:
            step_loss = 0.0
            for _ in range(grad_accum):
                x = _next_batch(blocks, st, gen, batch_size).to(dev)
                loss = model(input_ids=x, labels=x, use_cache=False).loss / grad_accum
                loss.backward()
                step_loss += float(loss.detach())
                tokens += x.numel()
            opt.step()
            opt.zero_grad(set_to_none=True)
            st.step, st.gen_state = step + 1, gen.get_state()
            st.losses.append(step_loss)
            rate = tokens / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{rate:.0f}")
            if log:
                log.write(json.dumps({"step": st.step, "loss": step_loss, "tokens_per_s": rate}) + "\n")
                log.flush()
            if on_step is not None:
                on_step(step, step_loss)
            if save_dir and save_every and st.step % save_every == 0 and st.step < max_steps:
                save_checkpoint(model, opt, st, save_dir)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        if log:
            log.close()
    if save_dir:
        save_checkpoint(model, opt, st, save_dir)
    seconds = time.perf_counter() - t0
    return TrainResult(steps=st.step, losses=st.losses, tokens_per_s=tokens / max(seconds, 1e-9), seconds=seconds,
                       interrupted=interrupted, resumed_from_step=start_step)
