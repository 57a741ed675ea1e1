"""What the ``fastllm`` subcommands do (``cli.py`` only parses arguments and dispatches here).

Each command prints human-readable lines and ends with one JSON line (``{"command": ..., ...}``), also
appended to ``--results`` when given, so runs can be collected as JSON lines.
"""

from __future__ import annotations

import gc
import json
import os
import time

import torch

SAMPLE_PROMPT = "And God said unto Moses,"
GC_MODES = {"auto": "auto", "on": True, "off": False, "offload": "offload"}


class InputError(ValueError):
    """Bad command-line input; ``fastllm`` prints the message as one line and exits with status 2."""


def emit(record: dict, results: str | None) -> None:
    line = json.dumps(record)
    print(line)
    if results:
        os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
        with open(results, "a") as f:
            f.write(line + "\n")


def _load_qlora(args, *, adapter: str | None = None, trainable: bool = True, need_tokenizer: bool = True):
    from . import FastLlama, PatchConfig
    from .loader import DEFAULT

    gc_mode = GC_MODES[getattr(args, "gradient_checkpointing", "auto")]
    budget = getattr(args, "memory_budget", None)
    if budget is not None and gc_mode != "auto":  # before the load: a bad flag costs nothing
        raise InputError(f"--memory-budget applies to --gradient-checkpointing auto, got "
                         f"{args.gradient_checkpointing}: drop --memory-budget or pass auto")
    dtype = getattr(args, "dtype", "auto")
    model, tok = FastLlama.from_pretrained(args.model or DEFAULT, max_seq_length=args.max_seq_length,
                                           dtype=None if dtype == "auto" else dtype,
                                           patch=False if getattr(args, "no_patch", False) else PatchConfig())
    if tok is None and need_tokenizer:
        raise InputError(f"{args.model} has no tokenizer; fastllm's commands need one in the checkpoint")
    if adapter:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter, is_trainable=trainable), tok
    return FastLlama.get_peft_model(model, r=args.lora_r, lora_alpha=args.lora_r, use_gradient_checkpointing=gc_mode,
                                    memory_budget=budget), tok


def _data(args, tok, n_train_blocks: int):
    from .data import DataError, chunk_texts, load_texts, pack, split_texts

    # cut long documents (one paragraph, a huge line) so there are several to hold one out from
    texts = chunk_texts(load_texts(args.data, tok), max(1000, 4 * args.max_seq_length))
    train_texts, held_texts = split_texts(texts, seed=args.seed)
    if not held_texts or (n_train_blocks and not train_texts):
        raise DataError(f"{args.data} gives only {len(texts)} document(s) of text: training and held-out "
                        "perplexity need at least two; add more text")
    train = pack(tok, train_texts, args.max_seq_length, max_blocks=n_train_blocks) if n_train_blocks else None
    held = pack(tok, held_texts, args.max_seq_length, max_blocks=args.eval_blocks)
    return train, held, held_texts


def _sample_prompt(args, held_texts: list[str]) -> str:
    """--prompt, else a fixed KJV opening for the default text, else the first half of a held-out document."""
    if getattr(args, "prompt", None):
        return args.prompt
    if args.data is None:
        return SAMPLE_PROMPT
    text = held_texts[0]
    return text[: max(1, len(text) // 2)]


def loss_curve_png(losses: list[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RUN_KEYS = ("model", "data", "max_seq_length", "batch_size", "grad_accum", "lr", "optim", "lora_r", "seed", "dtype")
RUN_DEFAULTS = {"dtype": "auto"}  # what a run saved before the key existed used
# what a train run writes to --output (removed by --overwrite; nothing else in the directory is touched)
RUN_FILES = ("run_config.json", "train_log.jsonl", "run_summary.json", "loss_curve.png", "trainer_state.pt",
             "adapter_model.safetensors", "adapter_config.json")


def _check_writable(path: str | None, what: str) -> None:
    """Fail before training, not after it, when a results file cannot be written."""
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as err:
        raise InputError(f"cannot write {what} {path!r} ({err.strerror or err}); pass a writable path") from None


def _remove_run(out: str) -> None:
    import shutil

    from .training import list_checkpoints

    for _, path in list_checkpoints(out):
        shutil.rmtree(path)
    for name in RUN_FILES:
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def _prepare_output(args) -> str | None:
    """Check --output against --resume / --overwrite; returns the directory to resume from, or None."""
    from .training import clean_stale, list_checkpoints

    out = args.output
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--output {out!r} is a file; pass a directory")
    clean_stale(out)  # what a killed save left behind
    cfg_path = os.path.join(out, "run_config.json")
    saved = list_checkpoints(out)
    mine = {k: getattr(args, k) for k in RUN_KEYS}
    if args.resume:
        if not os.path.isfile(cfg_path):
            raise InputError(f"--resume: nothing to resume in {out} (no run_config.json); drop --resume")
        with open(cfg_path) as f:
            old = json.load(f)
        old = {k: old.get(k, RUN_DEFAULTS.get(k)) for k in RUN_KEYS}
        diff = {k: (old[k], v) for k, v in mine.items() if old[k] != v}
        if diff:
            raise InputError(f"--resume with different settings than the saved run (saved, now): {diff}")
        if saved and saved[-1][0] >= args.max_steps:
            raise InputError(f"the run in {out} is already at step {saved[-1][0]}: --max-steps {args.max_steps} "
                             f"leaves nothing to train; pass --max-steps above {saved[-1][0]}")
        return out
    if saved or any(os.path.isfile(os.path.join(out, n)) for n in RUN_FILES):
        if not args.overwrite:
            raise InputError(f"--output {out} holds an earlier run; pass --resume to continue it, --overwrite to "
                             "replace it, or another --output")
        _remove_run(out)
    os.makedirs(out, exist_ok=True)
    with open(cfg_path, "w") as f:
        json.dump(mine, f, indent=1)
    return None


def cmd_train(args) -> int:
    from .training import perplexity, sample, train

    torch.manual_seed(args.seed)
    _check_writable(args.results, "--results")
    resume = _prepare_output(args)
    t0 = time.time()
    model, tok = _load_qlora(args)
    need = args.max_steps * args.batch_size * args.grad_accum
    blocks, held, held_texts = _data(args, tok, max(need, 64))
    print(f"loaded in {time.time() - t0:.1f}s; {len(blocks)} training blocks x {args.max_seq_length} tokens, "
          f"{len(held)} held-out blocks")
    ppl_before = perplexity(model, held)
    print(f"held-out perplexity before: {ppl_before:.2f}")
    result = train(model, blocks, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                   lr=args.lr, optim=args.optim, seed=args.seed, resume_from=resume, save_dir=args.output,
                   save_every=args.save_every, log_path=os.path.join(args.output, "train_log.jsonl"))
    if result.interrupted:
        print(f"\ninterrupted at step {result.steps}: checkpoint saved to {args.output} "
              f"(continue with --resume)")
        return 130
    ppl_after = perplexity(model, held)
    print(f"held-out perplexity after:  {ppl_after:.2f}  ({result.tokens_per_s:.0f} tokens/s training)")
    prompt = _sample_prompt(args, held_texts)
    text = sample(model, tok, prompt, max_len=args.max_seq_length)
    print(f"sample: {prompt}{text}")
    loss_curve_png(result.losses, os.path.join(args.output, "loss_curve.png"),
                   f"fastllm train: {args.model or 'SmolLM2-135M'} on {args.data or 'KJV'}")
    summary = {"command": "train", "model": args.model or "default", "data": args.data or "kjv",
               "steps": result.steps, "resumed_from_step": result.resumed_from_step, "losses": result.losses,
               "tokens_per_s": result.tokens_per_s, "seconds": result.seconds, "perplexity_before": ppl_before,
               "perplexity_after": ppl_after, "sample": text, "output": args.output}
    with open(os.path.join(args.output, "run_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"saved the LoRA adapter, loss_curve.png and run_summary.json to {args.output}")
    emit({k: v for k, v in summary.items() if k != "losses"}, args.results)
    return 0


def cmd_eval(args) -> int:
    from .training import ADAPTER_FILES, perplexity

    _check_writable(args.results, "--results")
    missing = [n for n in ADAPTER_FILES if args.adapter and not os.path.isfile(os.path.join(args.adapter, n))]
    if missing:
        raise InputError(f"--adapter {args.adapter!r} is not a PEFT adapter directory ({missing[0]} missing); "
                         "pass fastllm train's --output")
    model, tok = _load_qlora(args, adapter=args.adapter, trainable=False) if args.adapter else _base(args)
    _, held, _ = _data(args, tok, 0)
    ppl = perplexity(model, held, progress=True)
    print(f"held-out perplexity: {ppl:.2f} ({len(held)} blocks x {args.max_seq_length} tokens)")
    emit({"command": "eval", "model": args.model or "default", "adapter": args.adapter, "data": args.data or "kjv",
          "perplexity": ppl, "blocks": len(held), "seq_len": args.max_seq_length}, args.results)
    return 0


def _base(args):
    from . import FastLlama
    from .loader import DEFAULT

    model, tok = FastLlama.from_pretrained(args.model or DEFAULT, max_seq_length=args.max_seq_length)
    if tok is None:
        raise InputError(f"{args.model} has no tokenizer; fastllm's commands need one in the checkpoint")
    return model, tok


_OOM_MESSAGES = ("out of memory", "can't allocate memory",
                 # oneDNN (CPU matmuls) reports a failed scratchpad allocation this way
                 "could not create a primitive")


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in msg for m in _OOM_MESSAGES)


def _free(model) -> None:
    model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fits(model, batch: int, seq_len: int) -> bool:
    """One real forward + backward at (batch, seq_len); False (memory freed) if it runs out of memory."""
    dev = next(model.parameters()).device
    try:
        x = torch.randint(0, model.config.get_text_config().vocab_size, (batch, seq_len), device=dev)
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        return True
    except Exception as err:  # only out-of-memory is an answer; anything else is a real error
        if not _is_oom(err):
            raise
        return False
    finally:
        _free(model)


def find_max_batch(model, seq_len: int, cap: int, progress: bool = True) -> int:
    """Largest batch in [1, cap] whose step fits: doubling, then binary search between the last fit and miss."""
    from tqdm.auto import tqdm

    bar = tqdm(desc="max-batch", disable=not progress, dynamic_ncols=True)
    good, bad, b = 0, cap + 1, 1
    while b <= cap and fits(model, b, seq_len):
        good, b = b, b * 2
        bar.update(1)
        bar.set_postfix(fits=good)
    bad = min(b, cap + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(model, mid, seq_len):
            good = mid
        else:
            bad = mid
        bar.update(1)
        bar.set_postfix(fits=good, fails=bad)
    bar.close()
    return good


def cmd_max_batch(args) -> int:
    model, _ = _load_qlora(args, need_tokenizer=False)
    model.train()
    best = find_max_batch(model, args.max_seq_length, args.cap)
    dev = next(model.parameters()).device
    if best == 0:
        print(f"not even batch 1 x {args.max_seq_length} fits on {dev}")
    else:
        print(f"largest batch that fits: {best} x {args.max_seq_length} tokens on {dev}"
              + (f" (search capped at {args.cap})" if best == args.cap else ""))
    emit({"command": "max-batch", "model": args.model or "default", "seq_len": args.max_seq_length,
          "max_batch": best, "cap": args.cap, "device": str(dev)}, args.results)
    return 0 if best else 1


def cmd_merge(args) -> int:
    """Merge a LoRA adapter into the 16-bit base weights; the result loads in plain transformers."""
    from peft import PeftModel

    from . import FastLlama
    from .loader import DEFAULT

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    base, tok = FastLlama.from_pretrained(args.model or DEFAULT, load_in_4bit=False, dtype=dtype, patch=False)
    merged = PeftModel.from_pretrained(base, args.adapter).merge_and_unload()
    merged.save_pretrained(args.output)
    if tok is not None:
        tok.save_pretrained(args.output)
    print(f"merged {args.adapter} into {args.model or 'the default model'} ({args.dtype}): {args.output}")
    emit({"command": "merge", "model": args.model or "default", "adapter": args.adapter, "output": args.output,
          "dtype": args.dtype}, args.results)
    return 0
