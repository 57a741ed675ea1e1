"""HF Trainer on a ``shard()``-ed FastLlama QLoRA model: 2 gloo CPU ranks (torchrun) vs 1 process, same global batch.

Trainer is given the already-sharded model; it must neither wrap it in DDP (which refuses DTensor
parameters) nor shard it again. The runs are this file's ``__main__`` under ``torchrun`` and under plain
Python; rank 0 writes the logged losses and the full LoRA weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLOBAL_BATCH, GRAD_ACCUM, STEPS = 4, 2, 3


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(cmd, timeout=240):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def _load(out):
    from safetensors.torch import load_file

    with open(os.path.join(out, "result.json")) as f:
        return json.load(f), load_file(os.path.join(out, "lora.safetensors"))


@pytest.mark.parametrize("kind", ["hf", "trl"])
def test_trainer_on_two_sharded_ranks_equals_one_process(tiny_llama_dir, tmp_path, kind):
    """``kind``: HF ``Trainer`` (fastllm's chunked loss inside the root forward), or TRL ``SFTTrainer`` (its
    own fused log-prob head on the gathered ``lm_head.weight``, the backbone called directly)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    me = os.path.abspath(__file__)
    _run([sys.executable, me, tiny_llama_dir, one, kind])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", me, tiny_llama_dir, two,
          kind])
    (r1, w1), (r2, w2) = _load(one), _load(two)
    assert r1["world"] == 1 and r2["world"] == 2
    # Trainer kept the model as given: no DDP wrapper, the LoRA weights still DTensor shards, and the
    # optimizer holds state for the LoRA shards only.
    assert r2["unwrapped"] and r2["wrapped"] == "FSDPPeftModelForCausalLM"
    assert r2["lora_dtensors"] == r2["trainable"] == 28
    assert r2["optimizer_state_tensors"] == 28 and r2["frozen_with_grad"] == 0
    l1, l2 = torch.tensor(r1["losses"]), torch.tensor(r2["losses"])
    assert len(l1) == STEPS and l1[-1] < l1[0]
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    assert sorted(w1) == sorted(w2) and len(w1) == 28
    assert max(v.abs().max().item() for k, v in w1.items() if "lora_B" in k) > 1e-3
    if kind == "hf":  # fp32 LoRA weights: equal updates
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
        return
    # TRL trains bf16 LoRA weights: each rank's bf16 gradient is rounded before the reduction, and AdamW's
    # first steps move a weight by ~lr times its gradient's sign, so near-zero gradients whose sign flips
    # land a bf16 step apart. Measured: relative (Frobenius) error per tensor 0.045, losses 2.4e-6 apart.
    assert all(v.dtype == torch.bfloat16 for v in w2.values())
    assert max(((w2[k].float() - w1[k].float()).norm() / w1[k].float().norm()).item() for k in w1) < 0.1


# ---- the run (1 process, or one torchrun rank) ------------------------------------------------

def _dataset(n=GLOBAL_BATCH * GRAD_ACCUM * STEPS, t=24, vocab=320):
    """Rows whose label counts differ (2 vs 21), so the loss must be normalised over the global batch."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        ids = torch.randint(0, vocab, (t,), generator=g)
        labels = ids.clone()
        labels[: (t - 3) if i % 2 else 2] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "attention_mask": [1] * t})
    return rows


def _tokenizer(vocab=320):
    """A word-level tokenizer over the tiny model's ids (no download): TRL needs one for its pad token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="t0")), pad_token="t0",
                                   eos_token="t1")


def _trainer(kind, model, out, world):
    common = dict(output_dir=out, per_device_train_batch_size=GLOBAL_BATCH // world,
                  gradient_accumulation_steps=GRAD_ACCUM, max_steps=STEPS, learning_rate=1e-2,
                  lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                  seed=0, data_seed=0, dataloader_num_workers=0)
    if kind == "hf":
        from transformers import Trainer, TrainingArguments

        return Trainer(model=model, args=TrainingArguments(**common), train_dataset=_dataset())
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # Already tokenized rows with labels: TRL keeps them as they are (no chat template, no truncation).
    cfg = SFTConfig(**common, max_length=None, packing=False, bf16=False)
    return SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(_dataset()), processing_class=_tokenizer())


def _main(model_dir: str, out: str, kind: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from fastllm import FastLlama
    from fastllm.integrations.fsdp2 import full_lora_state_dict, shard, trainable_parameters

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    model, _ = FastLlama.from_pretrained(model_dir, dtype=torch.float32, device_map=None, max_seq_length=64)
    torch.manual_seed(0)
    model = FastLlama.get_peft_model(model, r=4, lora_alpha=4)
    if kind == "trl":
        # SFTTrainer casts a quantized model's LoRA weights to bf16 (``param.data = ...``, the QLoRA paper's
        # recipe). FSDP2 fixes each parameter's dtype at shard() time, so the cast must come first.
        for p in trainable_parameters(model):
            p.data = p.data.to(torch.bfloat16)
    if world > 1:
        shard(model)
    trainer = _trainer(kind, model, out, world)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res = dict(world=world, losses=losses, wrapped=type(trainer.model_wrapped).__name__,
               unwrapped=trainer.model_wrapped is model,  # fully_shard renames the class, same object
               trainable=sum(1 for p in model.parameters() if p.requires_grad),
               lora_dtensors=sum(1 for p in model.parameters() if p.requires_grad and isinstance(p, DTensor)),
               frozen_with_grad=sum(1 for p in model.parameters() if not p.requires_grad and p.grad is not None),
               optimizer_state_tensors=len(trainer.optimizer.state))
    lora = full_lora_state_dict(model)  # a collective: every rank joins
    if int(os.environ.get("RANK", "0")) == 0:
        from safetensors.torch import save_file

        os.makedirs(out, exist_ok=True)
        save_file({k: v.contiguous() for k, v in lora.items()}, os.path.join(out, "lora.safetensors"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)
    if dist.is_initialized():
        _leave(dist)


def _leave(dist) -> None:
    """End a rank: barrier, destroy the group, then exit without interpreter finalization. Gloo's worker threads
    can still hold work objects (FSDP2's async reduce-scatters) whose tensors, freed during finalization, abort
    the process after a good run ("terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2], sys.argv[3])
