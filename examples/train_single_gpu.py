"""Single-device QLoRA with a plain PyTorch loop: the fastllm API end to end.

    python examples/train_single_gpu.py --max-steps 20            # GPU if present, else CPU

Loads the embedded SmolLM2-135M-Instruct (or --model) in 4-bit, adds LoRA, trains on the King James text,
compares the patched loss against exact eager transformers with ``fastllm.eager``, and restores the eager
model with ``fastllm.unpatch``.
"""

import argparse

import torch

import fastllm
from fastllm import FastLlama
from fastllm.data import load_texts, pack, split_texts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=fastllm.DEFAULT)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args()

    model, tokenizer = FastLlama.from_pretrained(args.model, load_in_4bit=True, max_seq_length=args.seq_len)
    print(fastllm.patch_report(model))
    model = FastLlama.get_peft_model(model, r=16, lora_alpha=16)  # a normal peft.PeftModel
    train_texts, _ = split_texts(load_texts(None))
    blocks = pack(tokenizer, train_texts, args.seq_len, max_blocks=args.max_steps * args.batch_size)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-4)
    model.train()
    for step in range(args.max_steps):
        x = blocks[step * args.batch_size:(step + 1) * args.batch_size].to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step + 1}: loss {loss.item():.4f}")
    with torch.no_grad():
        patched = model(input_ids=x, labels=x).loss.item()
        with fastllm.eager(model):  # the exact eager transformers model, side by side
            eager = model(input_ids=x, labels=x).loss.item()
    print(f"patched loss {patched:.5f} vs eager {eager:.5f}")
    print(f"unpatched {fastllm.unpatch(model)} changes; the model is plain transformers + PEFT again")


if __name__ == "__main__":
    main()
