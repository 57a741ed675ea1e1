"""A plain QLoRA training loop (what ``fastllm train`` runs), with resumable state, plus evaluation helpers.

A checkpoint is one unit: ``<dir>/checkpoint-<step>/`` holds the PEFT adapter (``adapter_model.safetensors`` +
``adapter_config.json``), ``trainer_state.pt`` (optimizer, step, losses, data order and cursor, RNG) and, written
last, ``checkpoint.json`` (the step and a SHA-256 of each file). It is made whole in a ``.tmp-*`` directory and
renamed into place, so a crash or ``kill -9`` mid-save leaves the previous checkpoint as it was; the adapter is
also copied to ``<dir>/`` (for ``eval``/``merge``/PEFT). ``train(..., resume_from=dir)`` continues from the
latest complete checkpoint exactly as an uninterrupted run would. SIGINT (Ctrl-C) and SIGTERM (a scheduler's
preemption) stop the loop after the current step and save; a second signal stops at once, dropping the
unfinished step.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from .checksums import sha256_file

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
STATE_FILE = "trainer_state.pt"
MANIFEST = "checkpoint.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, damaged, or behind/ahead of the request)."""


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
    torch_rng: torch.Tensor | None = None


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
def sample(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40, max_len: int | None = None) -> str:
    """Greedy continuation of ``prompt`` (repetition-penalised), decoded.

    ``max_len`` (e.g. the patched max_seq_length): the prompt keeps its last tokens and the continuation is
    shortened so that prompt + continuation fit.
    """
    was_training = model.training
    model.eval()
    try:
        enc = tokenizer(prompt, return_tensors="pt").to(_device(model))
        if max_len is not None:
            max_new_tokens = max(1, min(max_new_tokens, max_len // 2))
            keep = max(1, max_len - max_new_tokens)
            enc = {k: v[:, -keep:] for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2,
                             pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete (manifest written) checkpoints in ``out_dir``, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, name)) for name in os.listdir(out_dir)
             if (m := _CKPT.match(name)) and os.path.isfile(os.path.join(out_dir, name, MANIFEST))]
    return sorted(found)


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def clean_stale(out_dir: str) -> int:
    """Remove what an interrupted save left behind (``.tmp-*`` directories, ``*.tmp`` files); returns the count."""
    n = 0
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        path = os.path.join(out_dir, name)
        if name.startswith(".tmp-") or name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            n += 1
    return n


def _replace_dir(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, moving an existing ``dst`` aside first (a directory rename cannot overwrite)."""
    old = None
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=".tmp-old-", dir=os.path.dirname(dst))
        os.replace(dst, os.path.join(old, "x"))
    os.replace(src, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _publish_adapter(ckpt: str, out_dir: str) -> None:
    """Copy the checkpoint's adapter to ``out_dir`` file by file, each through a temporary and a rename."""
    for name in ADAPTER_FILES:
        tmp = os.path.join(out_dir, name + ".tmp")
        shutil.copyfile(os.path.join(ckpt, name), tmp)
        os.replace(tmp, os.path.join(out_dir, name))


def save_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, state: _LoopState, out_dir: str) -> str:
    """Write ``<out_dir>/checkpoint-<step>/`` as one unit (see the module docstring); older ones are removed."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=out_dir)
    model.save_pretrained(tmp)
    torch.save({"optimizer": opt.state_dict(), "step": state.step, "losses": state.losses, "order": state.order,
                "cursor": state.cursor, "gen_state": state.gen_state, "torch_rng": state.torch_rng},
               os.path.join(tmp, STATE_FILE))
    files = {name: sha256_file(os.path.join(tmp, name)) for name in (*ADAPTER_FILES, STATE_FILE)}
    with open(os.path.join(tmp, MANIFEST), "w") as f:  # last: its presence means the rest is whole
        json.dump({"step": state.step, "sha256": files}, f, indent=1)
    final = os.path.join(out_dir, f"checkpoint-{state.step}")
    _replace_dir(tmp, final)
    for step, path in list_checkpoints(out_dir):
        if step != state.step:
            shutil.rmtree(path, ignore_errors=True)
    _publish_adapter(final, out_dir)
    return final


def _verify(path: str) -> dict:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
        sums = manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST}; delete it to resume from an "
                              "earlier one or start over") from None
    for name, digest in sums.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file) or sha256_file(file) != digest:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing or not what was saved "
                                  "(truncated?); delete that directory to resume from an earlier one or start over")
    return manifest


def load_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, out_dir: str) -> _LoopState:
    """Restore the latest complete checkpoint of ``out_dir`` into ``model`` (LoRA weights) and ``opt``."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = latest_checkpoint(out_dir)
    if path is None:
        raise CheckpointError(f"no complete checkpoint to resume in {out_dir} (no checkpoint-<step>/ with a "
                              f"{MANIFEST}); drop --resume to start a new run")
    _verify(path)
    weights = load_file(os.path.join(path, "adapter_model.safetensors"), device=str(_device(model)))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"adapter in {path} does not match the model: unexpected {result.unexpected_keys[:3]}")
    saved = torch.load(os.path.join(path, STATE_FILE), weights_only=False)
    opt.load_state_dict(saved["optimizer"])
    return _LoopState(step=saved["step"], losses=list(saved["losses"]), order=saved["order"],
                      cursor=saved["cursor"], gen_state=saved["gen_state"], torch_rng=saved["torch_rng"])


def _next_batch(blocks: torch.Tensor, st: _LoopState, gen: torch.Generator, batch_size: int) -> torch.Tensor:
    if st.order is None or st.cursor + batch_size > len(st.order):
        st.order, st.cursor = torch.randperm(len(blocks), generator=gen), 0
    x = blocks[st.order[st.cursor:st.cursor + batch_size]]
    st.cursor += batch_size
    return x


class _StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step (``requested``); a second one raises
    KeyboardInterrupt at once. Installed only in the main thread (where Python delivers signals)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write, not print: a handler can run inside a print (tqdm's), and print is not reentrant
        os.write(2, f"\n{signal.Signals(signum).name}: saving after this step (again to stop now)\n".encode())

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_args(max_steps: int, batch_size: int, grad_accum: int, lr: float) -> None:
    for name, v in (("max_steps", max_steps), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number above 0, got {lr!r}")


def _start_state(model, opt, resume_from: str | None, max_steps: int, gen: torch.Generator) -> _LoopState:
    if not resume_from:
        return _LoopState(torch_rng=torch.get_rng_state())
    st = load_checkpoint(model, opt, resume_from)
    if st.step >= max_steps:
        raise CheckpointError(f"the run in {resume_from} is already at step {st.step}: max_steps={max_steps} "
                              f"leaves nothing to train; ask for more than {st.step} steps")
    gen.set_state(st.gen_state)
    torch.set_rng_state(st.torch_rng)
    return st


def _run_step(model, opt, blocks, st: _LoopState, gen, batch_size: int, grad_accum: int, dev) -> tuple[float, int]:
    """One optimizer step; on KeyboardInterrupt before ``opt.step`` the loop state is as it was at the start."""
    snap = (st.order, st.cursor, st.gen_state)
    step_loss, tokens = 0.0, 0
    try:
        for _ in range(grad_accum):
            x = _next_batch(blocks, st, gen, batch_size).to(dev)
            loss = model(input_ids=x, labels=x, use_cache=False).loss / grad_accum
            loss.backward()
            step_loss += float(loss.detach())
            tokens += x.numel()
    except KeyboardInterrupt:
        # the unfinished step's batches go back, so a resumed run draws them again
        st.order, st.cursor, st.gen_state = snap
        opt.zero_grad(set_to_none=True)
        raise
    # From here to the state update a second signal would leave weights and state apart: hold it.
    with _Deferred():
        opt.step()
        opt.zero_grad(set_to_none=True)
        st.step, st.gen_state, st.torch_rng = st.step + 1, gen.get_state(), torch.get_rng_state()
        st.losses.append(step_loss)
    return step_loss, tokens


class _Deferred:
    """Hold SIGINT/SIGTERM for a few statements and deliver them after (main thread only)."""

    def __enter__(self) -> _Deferred:
        self._got: list[int] = []
        self._old: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, lambda s, f: self._got.append(s))
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        for sig in self._got:
            signal.raise_signal(sig)


def train(model: nn.Module, blocks: torch.Tensor, *, max_steps: int, batch_size: int = 2, grad_accum: int = 1,
          lr: float = 2e-4, optim: str = "adamw", seed: int = 0, progress: bool = True, on_step=None,
          resume_from: str | None = None, save_dir: str | None = None, save_every: int = 0,
          log_path: str | None = None) -> TrainResult:
    """Train the trainable (LoRA) parameters on shuffled ``blocks`` (n, T) up to ``max_steps`` steps.

    ``resume_from``: a directory written by ``save_checkpoint`` (continue from its latest step). ``save_dir``:
    where a checkpoint is saved every ``save_every`` steps, at the end, and on SIGINT/SIGTERM (then
    ``interrupted`` is True). ``log_path``: JSON lines, one per step (step, loss, tokens/s).
    """
    from tqdm.auto import tqdm

    _check_args(max_steps, batch_size, grad_accum, lr)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: wrap it with FastLlama.get_peft_model first")
    opt = make_optimizer(params, optim, lr)
    gen = torch.Generator().manual_seed(seed)
    st = _start_state(model, opt, resume_from, max_steps, gen)
    start_step, dev = st.step, _device(model)
    model.train()
    tokens, t0, interrupted = 0, time.perf_counter(), False
    bar = tqdm(range(start_step, max_steps), desc="train", disable=not progress, dynamic_ncols=True,
               initial=start_step, total=max_steps)
    with _StopSignals() as stop, open(log_path, "a") if log_path else nullcontext() as log:
        try:
            for _ in bar:
                step_loss, n = _run_step(model, opt, blocks, st, gen, batch_size, grad_accum, dev)
                tokens += n
                rate = tokens / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{rate:.0f}")
                if log:
                    log.write(json.dumps({"step": st.step, "loss": step_loss, "tokens_per_s": rate}) + "\n")
                    log.flush()
                if on_step is not None:
                    on_step(st.step - 1, step_loss)
                if stop.requested:
                    interrupted = True
                    break
                if save_dir and save_every and st.step % save_every == 0 and st.step < max_steps:
                    save_checkpoint(model, opt, st, save_dir)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
        if save_dir:
            _final_save(model, opt, st, save_dir)
    seconds = time.perf_counter() - t0
    return TrainResult(steps=st.step, losses=st.losses, tokens_per_s=tokens / max(seconds, 1e-9), seconds=seconds,
                       interrupted=interrupted, resumed_from_step=start_step)


def _final_save(model, opt, st: _LoopState, save_dir: str) -> None:
    try:
        save_checkpoint(model, opt, st, save_dir)
    except KeyboardInterrupt:  # a third signal: the previous complete checkpoint stays; .tmp-* goes next run
        os.write(2, b"\nsave interrupted: the previous checkpoint is kept\n")
