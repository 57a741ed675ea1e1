"""A FastLlama QLoRA model trains unchanged under HF Trainer and TRL SFTTrainer and GRPOTrainer."""

import functools
import glob
import os

import pytest
import torch

from fastllm import FastLlama

from .test_fsdp2_trainer import _dataset


def _qlora(path, patch, seed=0):
    model, tok = FastLlama.from_pretrained(path, patch=patch, max_seq_length=128)
    torch.manual_seed(seed)
    return FastLlama.get_peft_model(model, r=8, lora_alpha=16), tok


def _uneven_dataset(n=8):
    """Examples whose label counts differ a lot (2 vs 21), so gradient accumulation must normalise by token
    count: the same rows the FSDP2 Trainer test uses."""
    return _dataset(n=n)


def _hf_train(model, data, out):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hf_trainer_patched_matches_eager_with_grad_accum(tiny_llama_dir, tmp_path):
    """Patched (chunked loss, no logits) and plain transformers+PEFT give the same Trainer losses.

    The micro-batches hold 2 vs 21 labelled tokens: a loss that ignored ``num_items_in_batch`` would weight
    them equally and drift far outside the tolerance.
    """
    data = _uneven_dataset()
    patched, _ = _qlora(tiny_llama_dir, patch=True)
    plain, _ = _qlora(tiny_llama_dir, patch=False)
    seen = {}
    fwd = patched.get_base_model().forward

    @functools.wraps(fwd)  # Trainer drops dataset columns that the forward's signature does not name
    def spy(*args, **kwargs):  # records what Trainer passes; the patched forward still runs
        out = fwd(*args, **kwargs)
        seen.update(num_items=kwargs.get("num_items_in_batch"), logits=out.logits)
        return out

    patched.get_base_model().forward = spy
    l1 = _hf_train(patched, data, tmp_path / "a")
    l2 = _hf_train(plain, data, tmp_path / "b")
    assert seen["num_items"] is not None and seen["logits"] is None
    assert len(l1) == len(l2) == 3
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), rtol=1e-2, atol=1e-2)


def test_hf_trainer_fused_lora_matches_eager_with_grad_accum(tiny_llama_i128_dir, tmp_path):
    """The fused QLoRA ops (``lora=True``: q/k/v, MLP and RoPE as single ops) under Trainer with gradient
    accumulation give plain transformers+PEFT+bnb's losses (i128 fixture: bnb's CPU dequant is right there)."""
    from fastllm import PatchConfig, patch_report

    data = _uneven_dataset()
    fused, _ = _qlora(tiny_llama_i128_dir, patch=PatchConfig(lora=True, nf4_linear=True))
    assert patch_report(fused).counts["lora_attention"] == 2 and patch_report(fused).counts["lora"] == 14
    plain, _ = _qlora(tiny_llama_i128_dir, patch=False)
    l1 = _hf_train(fused, data, tmp_path / "a")
    l2 = _hf_train(plain, data, tmp_path / "b")
    assert len(l1) == len(l2) == 3
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), rtol=1e-4, atol=1e-4)


def _chat_rows(n):
    import yaml

    spec = __import__("importlib").util.find_spec("chatterbot_corpus")
    if spec is None:
        pytest.skip("chatterbot-corpus is not installed (pip install --no-deps chatterbot-corpus==1.3.3)")
    root = os.path.join(spec.submodule_search_locations[0], "data", "english")
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "*.yml"))):
        with open(path, encoding="utf-8") as f:
            for conv in yaml.safe_load(f).get("conversations", []):
                if len(conv) >= 2 and all(isinstance(c, str) for c in conv[:2]):
                    rows.append({"messages": [{"role": "user", "content": conv[0]},
                                              {"role": "assistant", "content": conv[1]}]})
    return rows[:n]


@pytest.mark.slow
@pytest.mark.parametrize("packing,padding_free,lora", [(True, False, None), (True, True, None), (True, True, True)])
def test_trl_sft_trainer_on_the_default_model(tmp_path, packing, padding_free, lora):
    """Chat SFT with packing (and padding-free rows): trains, every LoRA weight moves.

    TRL >= 1.16 installs its own fused log-prob head on the model (``add_fused_lm_head``); on a fastllm model
    that call is routed to fastllm, so ``model(..., fused_lm_head=True)`` runs fastllm's loss forward
    (``modules.fused_head``) and the forward stays fastllm's.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = _chat_rows(48)
    from fastllm import PatchConfig

    # lora=True: the fused QLoRA ops, with the eager attention forward, on packed padding-free rows.
    model, tok = _qlora("SmolLM2-135M-Instruct", patch=PatchConfig(lora=lora, nf4_linear=lora))
    if lora:
        from fastllm import patch_report

        assert patch_report(model).counts["lora_attention"] == 30 and patch_report(model).counts["lora"] == 7 * 30
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, logging_steps=1, report_to=[], max_length=128, packing=packing,
                    padding_free=padding_free, save_strategy="no", learning_rate=5e-4, use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert hasattr(model.get_base_model().__dict__["forward"].__func__, "_fastllm_loss")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before)


@pytest.mark.slow
def test_trl_grpo_trainer_generates_and_trains_on_the_default_model(tmp_path):
    """TRL's GRPOTrainer without vLLM on a fastllm QLoRA model: it samples groups of completions through the patched
    model's ``generate`` (padded batches of prompts), scores them, and trains through fastllm's loss forward (TRL's
    fused log-prob head routed to fastllm); the adapters move and the reward is logged each step."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok = _qlora("SmolLM2-135M-Instruct", patch=True)
    tok.padding_side = "left"
    prompts = ["Name a colour.", "Count to three:", "What is the capital of France?", "Say hello."]
    generated = []

    def reward(completions, **kwargs):  # longer answers score higher: a reward with spread inside each group
        generated.extend(completions)
        return [len(c) / 10.0 for c in completions]

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                     max_completion_length=8, temperature=1.0, logging_steps=1, report_to=[], save_strategy="no",
                     learning_rate=5e-3, use_cpu=True, bf16=False, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert len(generated) == 2 * 4 and all(isinstance(c, str) for c in generated)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all("lora_" in n for n in moved)
    # TRL switches gradient checkpointing off and on around generation: fastllm's "auto" layer function is put back
    from fastllm import is_patched, patch_report

    auto = patch_report(model).live["gradient_checkpointing"]
    assert is_patched(model) and auto.passes >= 2 and set(auto.plan) == {"recompute"}
