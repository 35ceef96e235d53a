"""Pads and prompt / generated positions come from the prompt layout, not from the mask the
model body happens to receive: Gemma3 multimodal (dict of 4-D masks), chunked prefill and
``use_cache=False`` against unbatched runs, hand-written hooks and the normal path."""

from __future__ import annotations

import pytest
import torch

from conftest import MAX_TINY_PARAMS, _token_ids, chat_ids
from residlab.arch import resolve_arch
from residlab.errors import UsageError
from residlab.generation import generate_ids, padded_inputs
from residlab.hooks import Add, Capture, intervene
from residlab.models import LoadedModel

TEXTS = ["Explain how tides work and why there are two a day.",
         "Write a short poem about autumn leaves falling softly now.", "hi"]
LAYER, NEW = 1, 6


@pytest.fixture(scope="module")
def tiny_gemma3(tiny_tokenizer):
    """Gemma3ForConditionalGeneration (text + SigLIP vision tower), used with text only."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    text = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            sliding_window=8, max_position_embeddings=512,
                            layer_types=["sliding_attention", "full_attention",
                                         "sliding_attention"], **_token_ids(tiny_tokenizer))
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(config).eval()
    assert sum(p.numel() for p in model.parameters()) < MAX_TINY_PARAMS
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    return LoadedModel(model, tiny_tokenizer, "tiny-gemma3", torch.device("cpu"), torch.float32)


@pytest.fixture(params=["tiny_llama", "tiny_gemma3"])
def loaded(request):
    return request.getfixturevalue(request.param)


def test_resolve_arch_on_gemma3_multimodal(tiny_gemma3):
    model = tiny_gemma3.model
    arch = resolve_arch(model)
    assert arch.family == "gemma3" and arch.body is model.model.language_model
    assert arch.n_layers == 3 and arch.d_model == 64
    ids = torch.tensor(chat_ids(tiny_gemma3.tokenizer, TEXTS[:1]))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(arch.logits(out.hidden_states[-1]), out.logits)


def test_capture_in_padded_batch_equals_rows_alone(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = resolve_arch(model)
    prompts = chat_ids(tokenizer, TEXTS)
    inputs = padded_inputs(prompts, tokenizer.pad_token_id, "cpu")
    post = [Capture(layer, "resid_post") for layer in range(arch.n_layers - 1)]
    pre = [Capture(layer, "resid_pre") for layer in range(arch.n_layers)]
    with torch.no_grad(), intervene(model, post + pre, prompt_mask=inputs["attention_mask"]):
        model(**inputs)
    with torch.no_grad():
        alone = [model(torch.tensor([ids]), output_hidden_states=True).hidden_states
                 for ids in prompts]
    for row, real in enumerate(inputs["attention_mask"].bool()):
        for layer, capture in enumerate(post):
            assert torch.equal(capture.mask()[row], real)
            torch.testing.assert_close(capture.values()[row, real], alone[row][layer + 1][0],
                                       atol=1e-5, rtol=1e-4)
        for layer, capture in enumerate(pre):
            torch.testing.assert_close(capture.values()[row, real], alone[row][layer][0],
                                       atol=1e-5, rtol=1e-4)


def test_without_prompt_mask_unknown_pads_raise(tiny_gemma3, tiny_llama):
    """The Gemma3 body only sees per-layer-type 4-D masks: no silent guess about pads."""
    for loaded, fails in ((tiny_gemma3, True), (tiny_llama, False)):
        inputs = padded_inputs(chat_ids(loaded.tokenizer, TEXTS), 0, "cpu")
        capture = Capture(LAYER)
        with torch.no_grad(), intervene(loaded.model, [capture]):
            if fails:
                with pytest.raises(RuntimeError, match="pads.*prompt_mask"):
                    loaded.model(**inputs)
            else:
                loaded.model(**inputs)
                assert torch.equal(capture.mask(), inputs["attention_mask"].bool())


def _hand_added(model, ids: list[int], vector: torch.Tensor, positions: str) -> list[int]:
    """Oracle: full-sequence forwards + argmax with a plain PyTorch hook that adds ``vector``
    to the residual after block LAYER at sequence indices chosen by hand."""
    block = resolve_arch(model).blocks[LAYER]
    prompt_len, sequence = len(ids), list(ids)

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output  # (1, T, D)
        index = torch.arange(hidden.shape[1])
        chosen = index < prompt_len if positions == "prompt" else index >= prompt_len
        new = hidden + chosen[None, :, None] * vector
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for _ in range(NEW):
                sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    finally:
        handle.remove()
    return sequence[prompt_len:]


def _vectors(seed: int, scale: float) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(len(TEXTS), 64), dim=-1) * scale  # (B, D)


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_add_under_generate_changes_exactly_the_chosen_positions(loaded, positions):
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = chat_ids(tokenizer, TEXTS)
    vectors = _vectors(3, 12.0)
    before, after = Capture(LAYER), Capture(LAYER, positions=positions)
    add = Add(LAYER, vectors, site="resid_post", positions=positions)
    batched = generate_ids(model, tokenizer, prompts, max_new_tokens=NEW,
                           interventions=[before, add, after])
    diff = after.values() - before.values()  # (B, T, D)
    width = max(len(p) for p in prompts)
    index = torch.arange(diff.shape[1])[None, :]
    real = index >= torch.tensor([width - len(p) for p in prompts])[:, None]  # (B, T)
    chosen = real & ((index < width) if positions == "prompt" else (index >= width))
    assert torch.equal(after.mask(), chosen)
    assert torch.all(diff[~chosen] == 0)  # pads and the other positions untouched
    torch.testing.assert_close(diff[chosen], vectors[:, None, :].expand_as(diff)[chosen])
    plain = generate_ids(model, tokenizer, prompts, max_new_tokens=NEW)
    assert [g.token_ids for g in batched] != [g.token_ids for g in plain]  # the Add matters
    for row, ids in enumerate(prompts):
        single = generate_ids(model, tokenizer, [ids], max_new_tokens=NEW, interventions=[
            Add(LAYER, vectors[row], site="resid_post", positions=positions)])
        assert batched[row] == single[0]
        by_hand = _hand_added(model, ids, vectors[row], positions)
        assert batched[row].token_ids == by_hand[: len(batched[row].token_ids)]


def _run(loaded, positions: str, monkeypatch, **checkpoint):
    """Tokens and the Capture of one generation, with ``checkpoint`` generation settings."""
    for key, value in checkpoint.items():
        monkeypatch.setattr(loaded.model.generation_config, key, value)
    capture = Capture(LAYER, positions=positions)
    add = Add(LAYER, _vectors(5, 12.0), site="resid_post", positions=positions)
    out = generate_ids(loaded.model, loaded.tokenizer, chat_ids(loaded.tokenizer, TEXTS),
                       max_new_tokens=NEW, interventions=[add, capture],
                       generation_defaults="model")
    monkeypatch.undo()
    return [g.token_ids for g in out], capture


@pytest.mark.parametrize("positions", ["prompt", "generated"])
@pytest.mark.parametrize("setting", [{"prefill_chunk_size": 4},  # the prompt in pieces
                                     {"cache_implementation": "static"}],  # 4-D masks
                         ids=["chunked", "static"])
def test_chunked_prefill_and_static_cache_match_the_normal_path(
        loaded, positions, setting, monkeypatch):
    tokens, normal = _run(loaded, positions, monkeypatch)
    chunked_tokens, chunked = _run(loaded, positions, monkeypatch, **setting)
    if "prefill_chunk_size" in setting:
        assert len(chunked.chunks) > len(normal.chunks)  # the prompt really came in pieces
    assert chunked_tokens == tokens
    assert torch.equal(chunked.mask(), normal.mask())
    torch.testing.assert_close(chunked.values(), normal.values(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_no_cache_reruns_match_the_normal_path(loaded, positions, monkeypatch):
    tokens, normal = _run(loaded, positions, monkeypatch)
    rerun_tokens, rerun = _run(loaded, positions, monkeypatch, use_cache=False)
    assert rerun_tokens == tokens
    assert len(rerun.chunks) == NEW  # every step re-ran the whole sequence from position 0
    for chunk, mask in zip(rerun.chunks, rerun.masks, strict=True):
        assert torch.equal(mask, normal.mask()[:, : chunk.shape[1]])
    last = rerun.chunks[-1]  # (B, prompt width + NEW - 1, D), like the cached path's total
    assert last.shape[1] == normal.values().shape[1]
    torch.testing.assert_close(last, normal.values(), atol=1e-5, rtol=1e-4)


def test_prompt_mask_must_fit_the_batch(tiny_llama):
    model, tokenizer = tiny_llama.model, tiny_llama.tokenizer
    inputs = padded_inputs(chat_ids(tokenizer, TEXTS), tokenizer.pad_token_id, "cpu")
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(UsageError, match="prompt_mask has shape"), intervene(
            model, [Capture(LAYER)], prompt_mask=torch.ones(4)):
        pass
    with torch.no_grad(), pytest.raises(UsageError, match="prompt_mask has 2 rows"), intervene(
            model, [Capture(LAYER)], prompt_mask=inputs["attention_mask"][:2]):
        model(**inputs)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
               for m in model.modules()) == before


def test_without_prompt_mask_ambiguous_prompt_raises(tiny_llama):
    """use_cache=False re-runs the whole sequence: without the prompt layout the engine
    cannot tell prompt from generated, so it says so instead of guessing."""
    model, tokenizer = tiny_llama.model, tiny_llama.tokenizer
    inputs = padded_inputs(chat_ids(tokenizer, TEXTS), tokenizer.pad_token_id, "cpu")
    capture = Capture(LAYER, positions="generated")
    with torch.no_grad(), intervene(model, [capture]), pytest.raises(
            RuntimeError, match="prompt from generated.*prompt_mask"):
        model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       max_new_tokens=3, do_sample=False, use_cache=False,
                       pad_token_id=tokenizer.pad_token_id)
