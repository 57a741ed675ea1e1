"""Every architecture of the table (``fastllm.arch``) against its own eager transformers modules, on tiny random
checkpoints that switch on what differs from Llama (``conftest.TINY_ARCH_CONFIGS``): Mistral's window shorter than
the sequence, Qwen2's q/k/v biases and a sliding layer, Qwen3's per-head q/k norms and a sliding layer, Gemma 3's
(1 + w) norms around attention and the MLP, GeGLU, q/k norms, query_pre_attn_scalar and sliding/global layers with
their own RoPE tables."""

import contextlib

import peft
import pytest
import torch

from fastllm import FastModel, PatchConfig, eager, is_patched, patch, patch_report, unpatch
from fastllm._compat import hub_kernels_switch
from fastllm.arch import ARCHS, arch_of
from fastllm.modules.layer import LAYER_CALLS

TYPES = tuple(ARCHS)
VOCAB = 331


def _ids(n=2, t=37, seed=7, device=None):
    """Token ids on ``device`` (the model's: on a GPU machine the loader puts models on CUDA)."""
    ids = torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))
    return ids if device is None else ids.to(device)


def _qlora(path, dtype=torch.float32, **cfg):
    model, _ = FastModel.from_pretrained(path, dtype=dtype, max_seq_length=256,
                                         patch=PatchConfig(lora=True, nf4_linear=True, **cfg))
    torch.manual_seed(0)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B so the adapter shows in outputs and every gradient
            torch.nn.init.normal_(p, std=0.05)
    return model


def _loss_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused_layer", [False, True])
@pytest.mark.parametrize("model_type", TYPES)
def test_qlora_fused_ops_match_eager_fp32(tiny_arch_dir, model_type, fused_layer):
    model = _qlora(tiny_arch_dir(model_type), fused_layer=fused_layer)
    report = patch_report(model)
    arch = ARCHS[model_type]
    n_norms = 1 + 2 * (2 + 2 * arch.sandwich_norms + 2 * arch.qk_norm)  # final, per layer: 2 (Gemma 4), q/k norms
    n_norms += model_type == "gemma3"  # the image projector's soft-embedding norm (a Gemma3RMSNorm)
    assert report.counts["lora"] == 14 and report.counts["lora_attention"] == 2 and report.counts["mlp"] == 2
    assert report.counts["rms_norm"] == n_norms and report.counts["loss"] == 1 and not report.skipped
    model.train()
    ids = _ids(device=model.device)
    LAYER_CALLS.clear()
    loss, grads = _loss_grads(model, ids)
    assert LAYER_CALLS == ({"fused": 2} if fused_layer else {})
    with eager(model):  # PEFT's forward over bitsandbytes' Linear4bit and transformers' own modules
        ref_loss, ref_grads = _loss_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert sorted(grads) == sorted(ref_grads) and len(grads) == 28
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("model_type", TYPES)
def test_qlora_bf16_is_as_close_to_fp32_as_eager_bf16(tiny_arch_dir, model_type):
    """bf16 rounds op by op differently on the two paths: each is measured against the fp32 eager reference, and
    the fused path's error (loss, each LoRA gradient's relative L2 error) may not exceed eager bf16's by more
    than half again."""
    path = tiny_arch_dir(model_type)
    ref = _qlora(path)
    ids = _ids(device=ref.device)
    ref.train()
    with eager(ref):
        ref_loss, ref_grads = _loss_grads(ref, ids)
    model = _qlora(path, dtype=torch.bfloat16)
    model.train()
    LAYER_CALLS.clear()
    loss, grads = _loss_grads(model, ids)
    assert LAYER_CALLS == {"fused": 2}
    with eager(model):
        eager_loss, eager_grads = _loss_grads(model, ids)
    assert abs(loss.item() - ref_loss.item()) <= 1.5 * abs(eager_loss.item() - ref_loss.item()) + 2e-3

    def err(g, n):
        return ((g[n].float() - ref_grads[n]).norm() / ref_grads[n].norm()).item()

    for n in ref_grads:
        assert err(grads, n) <= 1.5 * err(eager_grads, n) + 1e-2, (n, err(grads, n), err(eager_grads, n))


def _no_hub_kernels() -> dict:
    """An unpatched load's kwargs without transformers' hub kernels (5.2x loads CUDA models with them, fetched from
    the Hub: an offline GPU machine cannot), so the twin compared against is plain transformers modules."""
    return {"use_kernels": False} if hub_kernels_switch() else {}


@pytest.mark.parametrize("model_type", TYPES)
def test_unpatch_is_bit_identical_to_a_never_patched_twin(tiny_arch_dir, model_type):
    path = tiny_arch_dir(model_type)
    model = FastModel.from_pretrained(path, dtype=torch.bfloat16, patch=False, **_no_hub_kernels())[0]
    twin = FastModel.from_pretrained(path, dtype=torch.bfloat16, patch=False, **_no_hub_kernels())[0]
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    patch(model, PatchConfig(gradient_checkpointing=True, max_seq_length=64, lora=True))
    assert is_patched(model)
    assert unpatch(model) > 0 and not is_patched(model)
    assert {name: dict(vars(m)) for name, m in model.named_modules()} == before
    x = _ids(t=23, device=model.device)
    with torch.no_grad():
        assert torch.equal(model(x).logits, twin(x).logits)
    model.train(), twin.train()
    assert torch.equal(model(x, labels=x).loss, twin(x, labels=x).loss)


@pytest.mark.parametrize("model_type", TYPES)
def test_full_precision_patches_and_generate_match_eager(model_type, save_arch):
    """Without 4-bit: the rms_norm / mlp / RoPE (lora_attention) / loss patches on odd widths (hidden 96, MLP 160);
    eval logits, the training loss and greedy generation against the same model under ``eager``."""
    path = save_arch(model_type, hidden_size=96, intermediate_size=160)
    model = FastModel.from_pretrained(path, load_in_4bit=False, dtype=torch.float32,
                                      patch=PatchConfig(lora=True))[0]
    report = patch_report(model)
    assert report.counts["lora_attention"] == 2 and report.counts["mlp"] == 2 and not report.skipped
    x = _ids(t=29, device=model.device)
    with torch.no_grad():
        logits = model(x).logits
        with eager(model):
            ref = model(x).logits
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
        prompt = x[:1, :9]
        out = model.generate(prompt, max_new_tokens=12, do_sample=False)
        with eager(model):
            ref_out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref_out) and out.shape[1] == 21
    model.train()
    loss = model(x, labels=x).loss
    with eager(model):
        ref_loss = model(x, labels=x).loss
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", TYPES)
def test_adapter_saved_from_fastllm_loads_in_plain_peft(tiny_arch_dir, model_type, tmp_path):
    """The adapter of a fastllm-patched model, saved with PEFT's ``save_pretrained``, loads into plain transformers +
    PEFT (CPU, no fastllm): the table's target modules, every LoRA weight bit for bit, and it changes the output."""
    from transformers import AutoModelForCausalLM

    path = tiny_arch_dir(model_type)
    model = _qlora(path)
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **_no_hub_kernels())
    plain = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    got, want = plain.peft_config["default"].target_modules, arch_of(model_type).lora_targets
    assert got == want if isinstance(want, str) else sorted(got) == sorted(want)
    lora = {k: v.cpu() for k, v in model.state_dict().items() if "lora_" in k}
    loaded = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    assert len(lora) == len(loaded) == 28
    for k in lora:
        assert torch.equal(lora[k], loaded[k]), k
    x = _ids(t=19)
    with torch.no_grad():
        with plain.disable_adapter():
            without = plain(x).logits
        assert not torch.allclose(plain(x).logits, without)


@pytest.mark.parametrize("model_type", TYPES)
def test_convergence_30_steps_patched_vs_eager(tiny_arch_dir, model_type):
    """Liger-style convergence check: the same 30 AdamW steps on the same batches, fused path vs eager; the two loss
    curves stay within 1e-3 (fp32 QLoRA: the paths differ by rounding only) and the loss falls."""
    curves = []
    for use_eager in (False, True):
        model = _qlora(tiny_arch_dir(model_type))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        curve = []
        for step in range(30):
            ids = _ids(seed=step % 4, device=model.device)
            with eager(model) if use_eager else contextlib.nullcontext():  # backward too: it recomputes
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    fast, ref = curves
    torch.testing.assert_close(fast, ref, rtol=1e-3, atol=1e-3)
    assert fast[-4:].mean() < fast[:4].mean() - 0.1


def test_hf_trainer_trains_each_architecture(tiny_arch_dir, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    for model_type in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3"):
        model = _qlora(tiny_arch_dir(model_type))
        data = Dataset.from_dict({"input_ids": _ids(n=8, t=21).tolist()})
        data = data.map(lambda r: {"labels": r["input_ids"]})
        args = TrainingArguments(output_dir=str(tmp_path / model_type), per_device_train_batch_size=4, max_steps=3,
                                 learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no",
                                 use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
        LAYER_CALLS.clear()
        result = Trainer(model=model, args=args, train_dataset=data).train()
        assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
        assert LAYER_CALLS["fused"] == 3 * 2  # every layer call of every step took the fused layer op


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma3_text"])
def test_fused_layer_triton_path_matches_torch_fallbacks(tiny_arch_dir, model_type, monkeypatch):
    """The fused layer's Triton RMSNorm (Qwen3's per-head q/k norms too) / RoPE / SwiGLU path, through the interpreter
    on the CPU, against its torch fallbacks and against eager: same loss and LoRA grads (fp32)."""
    from fastllm.modules import layer as fl

    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setattr(fl, "pick_backend", lambda *a, _b=backend: _b)
        model = _qlora(tiny_arch_dir(model_type))
        model.train()
        ids = _ids(t=19, device=model.device)
        LAYER_CALLS.clear()
        results.append(_loss_grads(model, ids))
        assert LAYER_CALLS == {"fused": 2}
    with eager(model):
        results.append(_loss_grads(model, ids))
    (loss, grads), (t_loss, t_grads), (e_loss, e_grads) = results
    for other_loss, other_grads in ((loss, grads), (e_loss, e_grads)):
        torch.testing.assert_close(t_loss, other_loss, rtol=1e-5, atol=1e-5)
        for n in grads:
            torch.testing.assert_close(t_grads[n], other_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_final_logit_softcapping_reaches_the_chunked_loss(save_arch):
    """A config that soft-caps the final logits (Gemma 2 style, ``final_logit_softcapping``): the patched chunked
    loss caps them too (fused cross-entropy kernel path and a per-token loss), equal to eager's loss and grads."""
    path = save_arch("gemma3_text", final_logit_softcapping=3.0)
    for loss_name in ("cross_entropy", "focal"):
        model = _qlora(path, loss=loss_name)
        assert patch_report(model).counts["loss"] == 1
        model.train()
        ids = _ids(device=model.device)
        loss, grads = _loss_grads(model, ids)
        with eager(model):
            ref_loss, ref_grads = _loss_grads(model, ids)
        if loss_name == "cross_entropy":
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
            for n in grads:
                torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
        else:  # eager has no focal loss: the cap must still change the patched value
            with torch.no_grad():
                model.base_model.model.config.final_logit_softcapping = None
                uncapped = model(input_ids=ids, labels=ids).loss
                model.base_model.model.config.final_logit_softcapping = 3.0
            assert not torch.allclose(loss, uncapped)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_long_layers_run_the_mlp_over_row_tiles(tiny_arch_dir, model_type, monkeypatch):
    """A layer with more rows than ``MLP_TILE_ROWS`` runs its MLP (and Gemma's norm after it) over row tiles in the
    fused layer's forward and backward: the same loss and LoRA grads as untiled and as eager (74 rows over tiles of
    16: a partial last tile). Tiles set by ``mlp_tile_rows`` around the forward (``"auto"``'s lean tiles) hold in
    the backward that runs after it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastllm.ops import lora_layer

    class GateUpRows(TorchDispatchMode):
        """The row counts of every op output as wide as the MLP's gate/up pair (2 x intermediate)."""

        def __init__(self, width):
            super().__init__()
            self.width, self.rows = width, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(r.alias_info is not None for r in func._schema.returns):
                return out  # a view (a dequantized weight's transpose is (hidden, 2I)) holds no new memory
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.width:
                    self.rows.append(t.numel() // self.width)
            return out

    path = tiny_arch_dir(model_type)
    results = []
    for tile in (10**9, 16, 24):
        monkeypatch.setattr(lora_layer, "MLP_TILE_ROWS", min(tile, 16))
        model = _qlora(path)
        model.train()
        ids = _ids(device=model.device)
        LAYER_CALLS.clear()
        with GateUpRows(2 * model.config.intermediate_size) as seen:
            if tile == 24:  # forward inside, backward (after it) outside the context
                with lora_layer.mlp_tile_rows(tile):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None}))
            else:
                monkeypatch.setattr(lora_layer, "MLP_TILE_ROWS", tile)
                results.append(_loss_grads(model, ids))
        assert LAYER_CALLS == {"fused": 2}
        # tiled: no [tokens, 2 x intermediate] tensor for the whole sequence, forward or backward (74 rows)
        assert seen.rows and max(seen.rows) == min(tile, ids.numel()), (tile, sorted(set(seen.rows)))
        assert tile != 24 or 16 not in seen.rows  # the backward kept the forward's tiles
    with eager(model):
        ref_loss, ref_grads = _loss_grads(model, ids)
    (loss, grads), *tiled = results
    for t_loss, t_grads in tiled:
        for other_loss, other_grads in ((loss, grads), (ref_loss, ref_grads)):
            torch.testing.assert_close(t_loss, other_loss, rtol=1e-5, atol=1e-5)
            for n in grads:
                torch.testing.assert_close(t_grads[n], other_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_gemma3_vision_checkpoint_trains_its_language_model_with_images(tiny_arch_dir, image_batch):
    """Gemma 3 4B+ (``gemma3``, Gemma3ForConditionalGeneration): the vision tower and projector stay 16-bit, frozen
    and without adapters; batches with images (their features scattered into the embeddings, a bidirectional mask
    over each image) give the fused layer's loss and LoRA grads equal to eager's, and greedy generation from an
    image prompt equals eager's."""
    import bitsandbytes as bnb

    model = _qlora(tiny_arch_dir("gemma3"))
    base = model.base_model.model
    vision = [base.model.vision_tower, base.model.multi_modal_projector]
    assert not any(isinstance(m, (bnb.nn.Linear4bit, peft.tuners.lora.LoraLayer)) for v in vision for m in v.modules())
    assert not any(p.requires_grad for v in vision for p in v.parameters())
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in base.model.language_model.modules()) == 14
    assert patch_report(model).counts["gradient_checkpointing"] == 2  # the decoder's layers, not the encoder's
    model.train()
    ids, types, pixels = image_batch(model)
    results = []
    for use_eager in (False, True):
        model.zero_grad(set_to_none=True)
        LAYER_CALLS.clear()
        with eager(model) if use_eager else contextlib.nullcontext():
            out = model(input_ids=ids, token_type_ids=types, pixel_values=pixels, labels=ids)
            out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
        assert use_eager or LAYER_CALLS["fused"] == 2
    (loss, grads), (ref_loss, ref_grads) = results
    assert len(grads) == 28 and grads.keys() == ref_grads.keys()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    # the image counts: other pixels, another loss
    other = model(input_ids=ids, token_type_ids=types, pixel_values=pixels.flip(-1), labels=ids).loss
    assert not torch.allclose(other, loss)
    model.eval()
    prompt = (ids[:1, :14], types[:1, :14], pixels[:1])
    with torch.no_grad():
        gen = model.generate(input_ids=prompt[0], token_type_ids=prompt[1], pixel_values=prompt[2],
                             max_new_tokens=10, do_sample=False)
        with eager(model):
            ref = model.generate(input_ids=prompt[0], token_type_ids=prompt[1], pixel_values=prompt[2],
                                 max_new_tokens=10, do_sample=False)
    assert torch.equal(gen, ref) and gen.shape[1] == 24
