"""Load a saved LoRA adapter with plain transformers + PEFT (no fastllm) and compare it with a reference.

    python examples/check_adapter.py --base BASE_DIR --adapter OUT2/adapter --reference OUT1/adapter

Checks that ``peft.PeftModel.from_pretrained`` takes the adapter with no missing or unexpected LoRA
keys and that the weights it installs are the saved ones, bit for bit; then reports, per tensor, the
relative (Frobenius) difference to ``--reference`` (e.g. the adapter of a 1-GPU run on the same global
batch) and the loss of both adapters on one batch. Prints one JSON line (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def load_adapter_file(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def installed_matches(model, saved: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """(tensors checked, names whose installed weight differs from the file)."""
    params = dict(model.named_parameters())
    bad, checked = [], 0
    for key, value in saved.items():
        # PEFT's file keys drop the adapter name: "...q_proj.lora_A.weight" -> "...q_proj.lora_A.default.weight"
        name = key
        for part in (".lora_A.weight", ".lora_B.weight"):
            name = name.replace(part, part.replace(".weight", ".default.weight"))
        p = params.get(name)
        if p is None or not torch.equal(p.detach().cpu().to(value.dtype), value):
            bad.append(key)
        checked += 1
    return checked, bad


def batch_loss(model, vocab: int, seq_len: int, device) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, seq_len), generator=g).to(device)
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="base checkpoint (the model the adapter was trained on)")
    p.add_argument("--adapter", required=True)
    p.add_argument("--reference", default=None, help="another adapter of the same run shape to compare with")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).to(device)
    saved = load_adapter_file(args.adapter)
    model = PeftModel.from_pretrained(base, args.adapter)
    model.eval()
    checked, bad = installed_matches(model, saved)
    vocab = base.config.get_text_config().vocab_size
    res = dict(adapter=args.adapter, tensors=len(saved), checked=checked, not_installed=bad,
               loss=batch_loss(model, vocab, args.seq_len, device))
    if args.reference:
        ref = load_adapter_file(args.reference)
        res["same_keys"] = sorted(ref) == sorted(saved)
        errs = {k: rel_err(saved[k], ref[k]) for k in saved if k in ref}
        res["max_rel_err"] = max(errs.values())
        res["mean_rel_err"] = sum(errs.values()) / len(errs)
        res["lora_B_max_abs"] = max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k)
        model.load_adapter(args.reference, adapter_name="reference")
        model.set_adapter("reference")
        res["reference_loss"] = batch_loss(model, vocab, args.seq_len, device)
    line = json.dumps(res)
    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return res


if __name__ == "__main__":
    main()
