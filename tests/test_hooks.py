"""The interventions engine against plain forwards and output_hidden_states."""

from __future__ import annotations

import pytest
import torch

from conftest import chat_ids
from residlab.arch import resolve_arch
from residlab.generation import generate_ids, left_pad
from residlab.hooks import Add, Capture, intervene

TEXTS = ["Explain how tides work.", "Write a short poem about autumn leaves falling softly now.",
         "hi"]


def _batch(loaded):
    ids = chat_ids(loaded.tokenizer, TEXTS)
    return left_pad(ids, loaded.tokenizer.pad_token_id, loaded.device)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_equals_output_hidden_states(tiny_model):
    model = tiny_model.model
    arch = resolve_arch(model)
    input_ids, mask = _batch(tiny_model)
    captures = [Capture(layer, "resid_post") for layer in range(arch.n_layers)]
    captures += [Capture(layer, "resid_pre") for layer in range(arch.n_layers)]
    with torch.no_grad(), intervene(model, captures):
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states  # n_layers + 1 entries; the last one is after the final norm
    for layer in range(arch.n_layers):
        assert torch.equal(captures[arch.n_layers + layer].values(), hidden[layer])
        if layer < arch.n_layers - 1:
            assert torch.equal(captures[layer].values(), hidden[layer + 1])
    assert torch.equal(captures[0].mask(), mask.bool())


def test_contributions_sum_to_block_update(tiny_model):
    """attn_out + mlp_out == resid_post - resid_pre (Llama, GPT-2 and Gemma2 post-norm)."""
    model = tiny_model.model
    arch = resolve_arch(model)
    input_ids, mask = _batch(tiny_model)
    sites = ("resid_pre", "resid_post", "attn_out", "mlp_out")
    captures = {(layer, site): Capture(layer, site)
                for layer in range(arch.n_layers) for site in sites}
    with torch.no_grad(), intervene(model, list(captures.values())):
        model(input_ids=input_ids, attention_mask=mask)
    for layer in range(arch.n_layers):
        got = {site: captures[layer, site].values() for site in sites}
        update = got["resid_post"] - got["resid_pre"]
        torch.testing.assert_close(got["attn_out"] + got["mlp_out"], update, atol=1e-5, rtol=1e-5)
        assert got["attn_out"].abs().max() > 0 and got["mlp_out"].abs().max() > 0


def test_zero_vector_leaves_logits_identical(tiny_model):
    model = tiny_model.model
    input_ids, mask = _batch(tiny_model)
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=mask).logits
        zero = torch.zeros(resolve_arch(model).d_model)
        for site in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            with intervene(model, [Add(1, zero, site=site)]):
                hooked = model(input_ids=input_ids, attention_mask=mask).logits
            assert torch.equal(plain, hooked)


def test_add_changes_output_and_hooks_are_removed(tiny_llama):
    model = tiny_llama.model
    input_ids, mask = _batch(tiny_llama)
    before = _hook_count(model)
    vector = torch.randn(resolve_arch(model).d_model)
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=mask).logits
        with intervene(model, [Add(1, vector)]):
            assert _hook_count(model) > before
            hooked = model(input_ids=input_ids, attention_mask=mask).logits
        after = model(input_ids=input_ids, attention_mask=mask).logits
    assert not torch.allclose(plain, hooked)
    assert _hook_count(model) == before
    assert torch.equal(plain, after)


def test_hooks_removed_after_exception(tiny_llama):
    model = tiny_llama.model
    before = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"), intervene(
        model, [Add(0, torch.ones(64)), Capture(2)]
    ):
        raise RuntimeError("boom")
    assert _hook_count(model) == before


def test_registration_error_leaves_no_hooks(tiny_llama):
    model = tiny_llama.model
    before = _hook_count(model)
    with pytest.raises(ValueError, match="out of range"), intervene(
        model, [Capture(0), Capture(99)]
    ):
        pass
    assert _hook_count(model) == before


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "attn_out"])
def test_vector_lands_exactly_where_asked_under_generate(tiny_llama, positions, site):
    """Capture before and after the Add in one run: the difference is the vector, exactly on
    the chosen real positions, never on pads, with the requested norm."""
    model, tokenizer = tiny_llama.model, tiny_llama.tokenizer
    prompts = chat_ids(tokenizer, TEXTS)
    scales = torch.tensor([3.0, 0.5, 7.0])
    directions = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    vectors = directions * scales[:, None]  # (B, D), one per row
    before, after = Capture(2, site), Capture(2, site, positions=positions)
    generate_ids(model, tokenizer, prompts, max_new_tokens=5,
                 interventions=[before, Add(2, vectors, site=site, positions=positions), after])
    diff = after.values() - before.values()  # (B, T, D)
    width = max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    total = diff.shape[1]
    position = torch.arange(total)[None, :]
    real = position >= (width - lengths)[:, None]  # (B, T): False on left pads
    is_prompt = position < width
    chosen = {"all": real, "prompt": real & is_prompt, "generated": real & ~is_prompt}[positions]
    assert total == width + 4  # the last generated token is never fed back
    assert torch.equal(after.mask(), chosen)
    assert torch.all(diff[~chosen] == 0)
    norms = diff[chosen].norm(dim=-1)
    expected = scales[:, None].expand(-1, total)[chosen]
    torch.testing.assert_close(norms, expected, atol=1e-5, rtol=1e-5)


def test_per_row_vectors_match_single_row_runs(tiny_llama):
    model = tiny_llama.model
    input_ids, mask = _batch(tiny_llama)
    vectors = torch.randn(3, 64)
    with torch.no_grad():
        with intervene(model, [Add(1, vectors)]):
            batched = model(input_ids=input_ids, attention_mask=mask).logits
        for row in range(3):
            with intervene(model, [Add(1, vectors[row])]):
                single = model(input_ids=input_ids[row:row + 1],
                               attention_mask=mask[row:row + 1]).logits
            real = mask[row].bool()
            torch.testing.assert_close(batched[row, real], single[0, real], atol=1e-5, rtol=1e-4)


def test_bad_vectors_are_rejected(tiny_llama):
    model = tiny_llama.model
    input_ids, mask = _batch(tiny_llama)
    with pytest.raises(ValueError, match="hidden size"), intervene(model, [Add(0, torch.ones(7))]):
        pass
    with pytest.raises(ValueError, match="NaN"), intervene(
        model, [Add(0, torch.full((64,), float("nan")))]
    ):
        pass
    with pytest.raises(ValueError, match="rows"), intervene(model, [Add(0, torch.ones(5, 64))]):
        model(input_ids=input_ids, attention_mask=mask)
    with pytest.raises(ValueError, match="positions"), intervene(
        model, [Capture(0, positions="middle")]
    ):
        pass


def test_negative_layers_are_normalised(tiny_llama):
    model = tiny_llama.model
    input_ids, mask = _batch(tiny_llama)
    last, minus_one = Capture(3), Capture(-1)
    with torch.no_grad(), intervene(model, [last, minus_one]):
        model(input_ids=input_ids, attention_mask=mask)
    assert torch.equal(last.values(), minus_one.values())

