"""Tiny seeded models built from configs (no downloads) and the embedded model for slow tests.

The tiny models share a small byte-level BPE tokenizer trained here, with a ChatML template,
so the whole pipeline (templating, padding, stop tokens) runs as on a real chat model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

IGNORED_CONSOLE = ("Failed to load resource",)  # 404 / 409 answers a page explains itself

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain how tides work and why there are two a day.",
    "Write a short poem about autumn leaves falling softly.",
    "def add(a, b): return a + b  # a tiny python function",
    "Quelle est la capitale de la France? Paris, bien sûr.",
    "How do I bake bread at home with flour, water, salt and yeast?",
] * 20
MAX_TINY_PARAMS = 1_000_000


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tokenizer()


def _save_tiny(root: Path, name: str, config, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < MAX_TINY_PARAMS, f"tiny {name} model has {n_params} parameters"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = root / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _token_ids(tokenizer) -> dict:
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, **_token_ids(tiny_tokenizer))
    return _save_tiny(tmp_path_factory.mktemp("models"), "tiny-llama", config, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import GPT2Config

    config = GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=512,
                        **_token_ids(tiny_tokenizer))
    return _save_tiny(tmp_path_factory.mktemp("models"), "tiny-gpt2", config, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import Gemma2Config

    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          max_position_embeddings=512, sliding_window=64,
                          **_token_ids(tiny_tokenizer))
    return _save_tiny(tmp_path_factory.mktemp("models"), "tiny-gemma2", config, tiny_tokenizer)


def _family_config(family: str, tokenizer):
    """Tiny configs of the other families in the architecture table."""
    import transformers

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=512, **_token_ids(tokenizer))
    configs = {
        "gpt_neox": ("GPTNeoXConfig", {**common, "use_parallel_residual": True}),
        "qwen3": ("Qwen3Config", {**common, "num_key_value_heads": 2, "head_dim": 16}),
        "olmo2": ("Olmo2Config", {**common, "num_key_value_heads": 2}),
        "mistral": ("MistralConfig", {**common, "num_key_value_heads": 2}),
        "phi3": ("Phi3Config", {**common, "num_key_value_heads": 2}),
    }
    name, kwargs = configs[family]
    return getattr(transformers, name)(**kwargs)


OTHER_FAMILIES = ["gpt_neox", "qwen3", "olmo2", "mistral", "phi3"]


@pytest.fixture(scope="session")
def other_families(tmp_path_factory, tiny_tokenizer):
    """Builds each further family of the table on first use (tiny, seeded, fp32 on CPU)."""
    built: dict = {}

    def get(family: str):
        if family not in built:
            config = _family_config(family, tiny_tokenizer)
            path = _save_tiny(tmp_path_factory.mktemp("models"), family, config, tiny_tokenizer)
            built[family] = load_fp32(path)
        return built[family]

    return get


def load_fp32(path: Path):
    from residlab.models import load_model

    return load_model(str(path), dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    return load_fp32(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    return load_fp32(tiny_gpt2_dir)


@pytest.fixture(scope="session")
def tiny_gemma2(tiny_gemma2_dir):
    return load_fp32(tiny_gemma2_dir)


@pytest.fixture(params=["tiny_llama", "tiny_gpt2", "tiny_gemma2", *OTHER_FAMILIES])
def tiny_model(request):
    """Each tiny layout in turn: Llama, Mistral, Qwen3, Phi3 (pre-norm), Gemma2 and OLMo2
    (post-norm), GPT-2, GPT-NeoX (parallel residual)."""
    if request.param in OTHER_FAMILIES:
        return request.getfixturevalue("other_families")(request.param)
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct in fp32 (slow tests only)."""
    from residlab.models import load_model

    return load_model("default", dtype="fp32", device="cpu")


def chat_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    from residlab.prompts import template_ids

    return [template_ids(tokenizer, [{"role": "user", "content": text}])[1] for text in texts]


@pytest.fixture(scope="session")
def dashboard_root(tmp_path_factory, embedded):
    """A folder holding ``experiments/demo``, made once on the embedded model (see
    ``tests/dashboard_fixture.py``): responses, captures, one extracted trait, projections,
    calibration, a model diff and lens/attention for one prompt, with hostile text."""
    from dashboard_fixture import build_dashboard_experiment

    prebuilt = os.environ.get("RESIDLAB_TEST_DASHBOARD_ROOT")  # one built by hand, to iterate
    if prebuilt:
        return Path(prebuilt)
    root = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(root / "experiments"))
        build_dashboard_experiment(root, embedded)
    return root


@pytest.fixture(scope="module")
def server(dashboard_root):
    """The dashboard of ``dashboard_root`` (with its noising runs) on a real uvicorn (the
    dashboard's browser tests)."""
    pytest.importorskip("uvicorn")
    from residlab.server.app import create_app
    from residlab.server.state import ServerState
    from test_server_api import serve_in_thread

    app = create_app(ServerState(), experiments_root=dashboard_root / "experiments",
                     noising_dir=dashboard_root / "noising" / "outputs")
    with serve_in_thread(app) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    """One headless Debian Chromium (through Playwright) per test module; each test opens its
    own pages (each page its own browser context)."""
    from test_viz import CHROMIUM, CHROMIUM_ARGS, _browser

    with _browser() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    """A Chromium page that fails the test on any page error, console error or dialog, and
    on any injected script having run (``window.__xss`` / ``__pwned``)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    try:
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" and not
                m.text.startswith(IGNORED_CONSOLE) else None)
        page.on("dialog", lambda dialog: page.errors.append("dialog: " + dialog.message))
        yield page
        assert page.evaluate("() => [window.__xss, window.__pwned]") == [None, None]
        assert page.errors == []
    finally:
        page.context.close()
