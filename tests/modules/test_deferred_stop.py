"""Generation's stop check read one step late (``fastllm.modules.deferred_stop``): the same tokens, scores and
logits as transformers' per-step check, including when every sequence stops early by EOS (the extra step is
undone), with transformers' own ``DeferredStopCheck`` doing the work. On the CPU the test stands the CPU in for CUDA
(``_defers``) and gives transformers a no-op device event (CPU ops finish before they return)."""

import pytest
import torch

from fastllm import FastLlama
from fastllm.modules import deferred_stop
from fastllm.modules.decode_graphs import static_generate

tf_utils = pytest.importorskip("transformers.generation.utils")


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def cpu_defers(monkeypatch):
    monkeypatch.setattr(deferred_stop, "_defers", lambda device: device.type in ("cpu", "cuda"))
    monkeypatch.setattr(torch, "Event", _Event)


@pytest.fixture(scope="module")
def model(tiny_llama_i128_dir):
    model, _ = FastLlama.from_pretrained(tiny_llama_i128_dir, dtype=torch.float32, max_seq_length=256)
    return model.eval()


def _generate(model, x, **kw):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0, **kw)


def test_the_swap_is_scoped_and_nests():
    base = tf_utils.DeferredStopCheck
    with deferred_stop.deferred_stop_checks() as on:
        assert on and tf_utils.DeferredStopCheck is not base and issubclass(tf_utils.DeferredStopCheck, base)
        with deferred_stop.deferred_stop_checks():
            pass
        assert tf_utils.DeferredStopCheck is not base  # the outer call's swap survives the inner one's end
    assert tf_utils.DeferredStopCheck is base
    deferred_stop.set_deferred_stop(False)
    try:
        with deferred_stop.deferred_stop_checks() as on:
            assert not on and tf_utils.DeferredStopCheck is base
    finally:
        deferred_stop.set_deferred_stop(None)


@pytest.mark.parametrize("stop_at", [None, 3])
def test_deferred_generate_equals_per_step(model, cpu_defers, stop_at):
    """Greedy batches of two, 12 new tokens; with ``stop_at``, EOS is the token the first row emits at that step and
    the second row's token at the same step too (both stop early: the deferred loop runs one extra step and undoes
    it), else no EOS (the length limit stops both, read on the host without delay)."""
    x = torch.randint(1, 320, (2, 7), generator=torch.Generator().manual_seed(3))
    free = _generate(model, x, max_new_tokens=12)
    kw = {"max_new_tokens": 12}
    if stop_at is not None:
        kw["eos_token_id"] = [int(free[0, 7 + stop_at]), int(free[1, 7 + stop_at])]
    want = _generate(model, x, **kw)
    before = deferred_stop.stats()["deferred"]
    with deferred_stop.deferred_stop_checks():
        got = _generate(model, x, **kw)
    assert deferred_stop.stats()["deferred"] == before + 1
    assert torch.equal(got, want), (got, want)
    if stop_at is not None:
        assert want.shape[1] <= 7 + stop_at + 1  # both rows stopped early, nothing past it kept


def test_returned_cache_keeps_the_per_step_check(model, cpu_defers):
    """``return_dict_in_generate`` hands the cache back: transformers would have to crop the extra step out of it,
    so the check stays per step there, with the same outputs."""
    x = torch.randint(1, 320, (1, 5), generator=torch.Generator().manual_seed(4))
    want = _generate(model, x, max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    before = deferred_stop.stats()
    got = static_generate(model, input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0,
                          max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    after = deferred_stop.stats()
    assert after["deferred"] == before["deferred"] and after["per step"] == before["per step"] + 1
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-5, atol=1e-5)


def test_patched_generate_defers(model, cpu_defers):
    """The patched model's ``generate`` (``static_generate``) runs in the deferral."""
    x = torch.randint(1, 320, (2, 5), generator=torch.Generator().manual_seed(5))
    want = _generate(model, x, max_new_tokens=5)
    before = deferred_stop.stats()["deferred"]
    with torch.no_grad():
        got = static_generate(model, input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0,
                              max_new_tokens=5)
    assert deferred_stop.stats()["deferred"] == before + 1
    assert torch.equal(got, want)
