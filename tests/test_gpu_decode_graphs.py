"""Decode steps as CUDA graphs (``PatchConfig(decode_graphs=...)``) on a real GPU: a replayed step computes what
the same eager step over the same static cache computes, for the eager fused and the compiled paths, across
generate calls, with adapters switched off between calls, with a padded batch, and when capture fails."""

import pytest
import torch

from fastllm import FastLlama, PatchConfig, eager, patch_report
from fastllm.modules.decode_graphs import decode_graphs_of
from fastllm.patching.api import find_base

pytestmark = pytest.mark.gpu

NEW = 7  # new tokens: the prefill gives the first, a warm-up step the second, then a capture and 4 replays


def _model(path, **cfg):
    model, _ = FastLlama.from_pretrained(path, dtype=torch.bfloat16, max_seq_length=256, patch=PatchConfig(**cfg))
    torch.manual_seed(0)
    model = FastLlama.get_peft_model(model, r=16, lora_alpha=16)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B so the adapters show in the logits
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _generate(model, x, mask=None, **extra):
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
               return_dict_in_generate=True, **extra)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.generate(input_ids=x, attention_mask=mask, **gen)
    return out.sequences, torch.stack(out.logits)


def _reference(model, x, mask=None, **extra):
    """The same decode steps without graphs over the same kind of (static) cache, transformers' compile off."""
    graphs = decode_graphs_of(find_base(model))
    graphs.disabled, saved = "reference run", graphs.disabled
    try:
        return _generate(model, x, mask, **extra)
    finally:
        graphs.disabled = saved


def _graphed_as_reference(model, x, **extra):
    """A fresh model's generate: one capture, the later steps replayed, tokens and logits equal to the same steps
    without graphs (the same kernels on the same data). Returns its (sequences, logits)."""
    graphs = decode_graphs_of(find_base(model))
    seq, logits = _generate(model, x, **extra)
    assert graphs.stats["captured"] == 1 and graphs.stats["replayed"] == NEW - 2, graphs.summary()
    ref_seq, ref_logits = _reference(model, x, **extra)
    torch.testing.assert_close(seq, ref_seq, rtol=0, atol=0)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    return seq, logits


@pytest.mark.parametrize("compile", [False, True])
def test_replayed_steps_equal_eager_steps(tiny_llama_i128_dir, compile):
    model = _model(tiny_llama_i128_dir, compile=compile)
    graphs = decode_graphs_of(find_base(model))
    x = torch.randint(0, 320, (1, 13), device="cuda")
    seq, logits = _graphed_as_reference(model, x)
    # A second generate call: a new cache object (maybe new tensors); the results stay the same.
    seq2, logits2 = _generate(model, x)
    torch.testing.assert_close(seq2, seq, rtol=0, atol=0)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    assert graphs.stats["replayed"] >= 2 * (NEW - 2)
    assert "decode_graphs: " in patch_report(model).summary()


def test_graphs_follow_transformers_eager(tiny_llama_i128_dir):
    """Against unpatched transformers + PEFT + bitsandbytes with its dynamic cache: the logits of every step."""
    model = _model(tiny_llama_i128_dir)
    x = torch.randint(0, 320, (1, 9), device="cuda")
    _, logits = _generate(model, x)
    with eager(model):
        _, want = _generate(model, x)
    err = ((logits.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 2e-2, err


def test_disabled_adapters_and_padded_batch(tiny_llama_i128_dir):
    model = _model(tiny_llama_i128_dir)
    x = torch.randint(0, 320, (2, 11), device="cuda")
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding on the second row
    seq, logits = _generate(model, x, mask)
    with model.disable_adapter():
        seq_off, logits_off = _generate(model, x, mask)
    assert (logits_off - logits).abs().max() > 0  # the adapters matter, so a stale graph would show
    ref = _reference(model, x, mask)
    with model.disable_adapter():
        ref_off = _reference(model, x, mask)
    torch.testing.assert_close(logits, ref[1], rtol=0, atol=0)
    torch.testing.assert_close(logits_off, ref_off[1], rtol=0, atol=0)
    assert decode_graphs_of(find_base(model)).stats["captured"] >= 2


def _sync(out):
    float(out[0].float().sum())  # reads a GPU value on the host: not allowed while capturing


def test_failed_capture_runs_eagerly_and_says_so(tiny_llama_i128_dir):
    model = _model(tiny_llama_i128_dir)
    layer = find_base(model).model.layers[0]
    handle = layer.register_forward_hook(lambda m, a, out: _sync(out))
    try:
        x = torch.randint(0, 320, (1, 10), device="cuda")
        seq, logits = _generate(model, x)
        graphs = decode_graphs_of(find_base(model))
        assert graphs.disabled is not None and graphs.disabled.startswith("capture failed")
        assert graphs.stats["captured"] == 0
        graphs.disabled = None
        ref = _reference(model, x)
    finally:
        handle.remove()
    torch.testing.assert_close(seq, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(logits, ref[1], rtol=0, atol=0)
    torch.randn(3, device="cuda")  # the CUDA generator still works outside graphs (its state was restored)


@pytest.mark.parametrize("change", ["grow", "clear"])
def test_replays_never_write_a_workspace_that_was_freed(tiny_llama_i128_dir, change):
    """Two rows: the 4-bit linears dequantize into the shared workspace inside the captured step (one row takes
    bnb's GEMV instead). After the workspace grows or is cleared, a tensor of the old buffer's size takes the memory
    the allocator got back; the next generate must neither replay into that memory (the graph keeps its buffer, so
    the allocator never got it back) nor replay the old graph at all (the step is captured again)."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    from fastllm.ops import nf4 as nf4_ops
    from fastllm.ops.nf4_gemv import set_enabled

    set_enabled(False)  # batched steps dequantize into the workspace with the GEMV off (the GEMV reads none)
    # A fresh buffer: the graphs of earlier tests' models (the workspace is shared by every model) hold theirs.
    gc.collect()
    nf4_ops.clear_workspaces()
    model = _model(tiny_llama_i128_dir)
    graphs = decode_graphs_of(find_base(model))
    x = torch.randint(0, 320, (2, 11), device="cuda")
    mask = torch.ones_like(x)
    seq, logits = _generate(model, x, mask)
    assert graphs.stats["captured"] == 1, graphs.summary()
    (graph,) = graphs.graphs.values()
    held = [b for b in graph.workspaces if b.is_cuda]
    assert held, "the captured step did not dequantize into the workspace: this test would prove nothing"
    old = [StorageWeakRef(b.untyped_storage()) for b in held]
    ptrs, sizes = {b.data_ptr() for b in held}, [(b.numel(), b.dtype) for b in held]
    del graph, held
    if change == "grow":
        for n, dtype in sizes:
            nf4_ops._workspace(torch.device("cuda", torch.cuda.current_device()), dtype, (2 * n,))
    else:
        nf4_ops.clear_workspaces()
    sentinels = [torch.full((n,), 7, dtype=dtype, device="cuda") for n, dtype in sizes]
    assert not ptrs & {s.data_ptr() for s in sentinels}  # the old buffers are still the graph's
    seq2, logits2 = _generate(model, x, mask)
    torch.cuda.synchronize()
    assert all(bool((s == 7).all()) for s in sentinels)
    assert graphs.stats["captured"] == 2, graphs.summary()  # captured again over the new workspace
    torch.testing.assert_close(seq2, seq, rtol=0, atol=0)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    gc.collect()
    assert all(r.expired() for r in old)  # the old graph went at the new capture, and its buffers with it


def test_trl_grpo_rollouts_are_graphed(tiny_llama_i128_dir, tmp_path):
    """TRL's GRPOTrainer (no vLLM) passes its own ``generation_config`` to ``generate``: the rollouts' decode steps
    still run as graphs (the wrapper gives that config a static cache), and the step trains."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from fastllm.bench.grpo import _reward, word_tokenizer

    model, _ = FastLlama.from_pretrained(tiny_llama_i128_dir, dtype=torch.bfloat16, max_seq_length=256)
    model = FastLlama.get_peft_model(model, r=8, lora_alpha=8)
    graphs = decode_graphs_of(find_base(model))
    tok = word_tokenizer(model.config.vocab_size)
    rows = [{"prompt": " ".join(f"w{i}" for i in range(3 + j, 9 + j))} for j in range(4)]
    cfg = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                     max_completion_length=NEW, generation_kwargs={"min_new_tokens": NEW}, logging_steps=1,
                     report_to=[], save_strategy="no", bf16=True)
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)
    trainer.train()
    assert graphs.stats["captured"] >= 1 and graphs.stats["replayed"] >= 2 * (NEW - 3), graphs.summary()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_dense_decode_copies_match_and_free_their_memory(tiny_llama_i128_dir):
    """``ops.dense_decode`` on a 4-bit model: graphed decode over the call's dense copies gives the default path's
    tokens and logits within bf16 rounding (a GEMM where one row took bnb's GEMV), and the copies' memory (and the
    graphs that read them) is gone when the call returns."""
    from fastllm.ops import dense_decode

    model = _model(tiny_llama_i128_dir)
    graphs = decode_graphs_of(find_base(model))
    x = torch.randint(0, 320, (1, 13), device="cuda")
    seq, logits = _generate(model, x)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    dense_decode.set_enabled(True)
    dense_decode.stats.clear()
    try:
        dseq, dlogits = _generate(model, x)
    finally:
        dense_decode.set_enabled(None)
    torch.cuda.synchronize()
    assert dense_decode.stats["copies"] == 2 * 4 and dense_decode.buffers() == () and not graphs.graphs
    assert torch.cuda.memory_allocated() <= before + (1 << 20)
    torch.testing.assert_close(dseq, seq, rtol=0, atol=0)
    torch.testing.assert_close(dlogits.float(), logits.float(), rtol=2e-2, atol=2e-2)


def test_gemma3_vision_prompt_is_graphed(tiny_arch_dir, image_batch):
    """Gemma 3 4B+ (``gemma3``): an image prompt's prefill runs the vision tower; the decode steps replay graphs of the
    language model (its embeddings and the per-layer-type mask mapping as graph inputs), with the same logits as the
    same steps without graphs, and close to transformers eager."""
    model = _model(tiny_arch_dir("gemma3"))
    ids, types, pixels = image_batch(model, n=1)
    extra = dict(token_type_ids=types, pixel_values=pixels.to(torch.bfloat16))
    seq, logits = _graphed_as_reference(model, ids, **extra)
    with eager(model):
        want_seq, want = _generate(model, ids, **extra)
    # bf16 over a tiny random model: a step's logits differ from eager's by 1-5% (as much with every patch off), so
    # greedy tokens may part at a near-tie; compare the steps up to and including the first that parts
    new = (seq[:, ids.shape[1]:] != want_seq[:, ids.shape[1]:]).any(0)
    j = int(new.nonzero()[0]) if new.any() else new.numel()
    err = (logits[:j + 1].float() - want[:j + 1].float()).norm(dim=-1) / want[:j + 1].float().norm(dim=-1)
    assert err.max().item() < 6e-2, err


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma2", "gemma3_text"])
def test_prompts_past_the_sliding_window_are_graphed(tiny_arch_dir, model_type):
    """A prompt longer than the window (16 in the tiny configs): every decode step updates a full sliding-window
    layer (a roll), which captures once and replays; the logits equal the same steps without graphs."""
    _graphed_as_reference(_model(tiny_arch_dir(model_type)), torch.randint(0, 320, (2, 21), device="cuda"))
