"""Capture memory is one batch whatever the number of prompts; the default batch; NaN / inf.

Memory is counted as the bytes of live tensors (every tensor object the garbage collector
knows, storages counted once, the model's own weights left out), sampled when the forward has
run every layer and whenever a file is written. The oracle for the values is a plain forward
with ``output_hidden_states`` over the same left-padded rows.
"""

from __future__ import annotations

import gc
import json
import logging
import random

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import load_fp32
from residlab.errors import UsageError
from residlab.experiments import load_experiment
from residlab.inference import capture as capture_module
from residlab.inference import capture_memory
from residlab.inference.capture import capture_prompt_set, default_batch_size
from residlab.inference.raw import load_raw

SET = "memory"
EVERY = ["residual", "attn_contribution", "mlp_contribution"]


@pytest.fixture
def experiment(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    config = {"model_variants": {"base": {"model": str(tiny_llama_dir), "dtype": "fp32",
                                          "device": "cpu"}},
              "defaults": {"application": "base"}}
    (tmp_path / "experiments" / "exp").mkdir(parents=True)
    (tmp_path / "experiments" / "exp" / "config.yaml").write_text(yaml.safe_dump(config))
    return load_experiment("exp")


def _responses(experiment, lengths: list[int], *, token: int | None = None,
               at: int | None = None) -> None:
    """Response JSONs ``0..n-1`` with seeded ids (3..299) of the given lengths; ``token`` is
    put at position -2 of prompt ``at`` only."""
    rng = random.Random(0)
    folder = experiment.responses_dir("base", SET)
    folder.mkdir(parents=True, exist_ok=True)
    for index, length in enumerate(lengths):
        ids = [rng.randrange(3, 300) for _ in range(length)]
        if index == at:
            ids[-2] = token
        (folder / f"{index}.json").write_text(json.dumps({"token_ids": ids,
                                                          "prompt_end": length // 3}))


def _live_bytes(exclude: set[int]) -> int:
    """Bytes of every live tensor storage, each once, leaving out the storages in ``exclude``."""
    seen, total = set(exclude), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _held_while_capturing(experiment, model, monkeypatch, **kwargs) -> dict[str, list[int]]:
    """Live tensor bytes (beyond the weights) at the end of each forward and at each write."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.model.parameters(),
                                                        *model.model.buffers()]}
    samples: dict[str, list[int]] = {"forward": [], "write": []}
    real_save = capture_module.save_raw
    gc.collect()
    # tensors alive before the capture (other tests' models and caches) are not its own
    before = {obj.untyped_storage().data_ptr() for obj in gc.get_objects()
              if issubclass(type(obj), torch.Tensor) and not obj.is_meta}
    weights |= before

    def save(path, tensors, meta):
        samples["write"].append(_live_bytes(weights))
        real_save(path, tensors, meta)

    monkeypatch.setattr(capture_module, "save_raw", save)
    norm = model.model.model.norm  # runs once every layer has been captured
    handle = norm.register_forward_hook(
        lambda *args: samples["forward"].append(_live_bytes(weights)))
    try:
        capture_prompt_set(experiment, SET, loaded=model, components=EVERY, **kwargs)
    finally:
        handle.remove()
        monkeypatch.setattr(capture_module, "save_raw", real_save)
    return samples


def test_memory_held_is_one_batch_whatever_the_number_of_prompts(experiment, tiny_llama,
                                                                monkeypatch):
    length, batch = 40, 2
    one_batch = batch * length * 4 * len(EVERY) * 64 * 4  # (B, T) x layers x parts x D x fp32
    peaks = {}
    for n in (4, 12):
        _responses(experiment, [length] * n)
        samples = _held_while_capturing(experiment, tiny_llama, monkeypatch, batch_size=batch,
                                        dtype="fp32")
        assert len(samples["forward"]) == n // batch and len(samples["write"]) == n
        held = samples["forward"] + samples["write"]
        # the batch being captured, plus the model's activations of the moment (final norm
        # output, position embeddings, mask: ~22% of it here); holding a second batch's
        # tensors, or a KV cache, or copies of the batch, would pass 1.3x
        assert max(held) <= 1.3 * one_batch, (max(held), one_batch)
        # what is held when writing batch k does not grow with k
        firsts = samples["write"][::batch]
        assert max(firsts) <= firsts[0] * 1.02 + 4096, firsts
        peaks[n] = max(held)
    assert peaks[12] <= peaks[4] * 1.02 + 4096


def test_the_estimate_of_a_prompt_covers_what_a_prompt_holds(experiment, tiny_llama,
                                                            monkeypatch):
    """The default batch is a budget divided by an estimate: it must not underestimate."""
    length = 40
    _responses(experiment, [length] * 4)
    samples = _held_while_capturing(experiment, tiny_llama, monkeypatch, batch_size=4,
                                    dtype="fp32")
    held_per_prompt = max(samples["forward"] + samples["write"]) / 4
    arch = capture_module.resolve_arch(tiny_llama.model)
    need = capture_memory._prompt_bytes(tiny_llama.model, arch, length, 4 * len(EVERY))
    assert held_per_prompt <= need <= 3 * held_per_prompt


def _oracle(model, rows: list[list[int]], pad: int) -> list[tuple]:
    """Hidden states of a plain forward over ``rows`` left-padded, one tuple per row (pads
    stripped): ``hidden[l + 1]`` is block l's output."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                    output_hidden_states=True)
    return [tuple(h[row, width - len(r):] for h in out.hidden_states)
            for row, r in enumerate(rows)]


def test_default_batch_and_batch_1_write_what_a_plain_forward_gives(experiment, tiny_llama,
                                                                  caplog):
    lengths = [9, 30, 17, 25, 12, 21]
    _responses(experiment, lengths)
    pad = tiny_llama.tokenizer.pad_token_id
    records = [json.loads((experiment.responses_dir("base", SET) / f"{i}.json").read_text())
               for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batched = _oracle(tiny_llama.model, [records[i]["token_ids"] for i in order], pad)
    expected = {"default": dict(zip(order, batched, strict=True)),
                "single": {i: _oracle(tiny_llama.model, [records[i]["token_ids"]], pad)[0]
                           for i in order}}
    for name, batch_size in [("default", None), ("single", 1)]:
        with caplog.at_level(logging.INFO, logger="residlab.inference.capture"):
            result = capture_prompt_set(experiment, SET, loaded=tiny_llama, dtype="fp32",
                                        batch_size=batch_size, capture_mlp=True)
        assert len(result.written) == len(lengths)
        for index, hidden in expected[name].items():
            raw = load_raw(experiment.raw_dir("base", SET) / f"{index}.safetensors")
            end = records[index]["prompt_end"]
            for layer in range(3):  # block 3's output is not hidden[4] (final norm)
                got = raw["response"]["activations"][layer]["residual"]
                assert torch.equal(got, hidden[layer + 1][end:]), (name, index, layer)
                prompt = raw["prompt"]["activations"][layer]
                assert torch.equal(prompt["residual"], hidden[layer + 1][:end])
                update = prompt["attn_contribution"] + prompt["mlp_contribution"]
                torch.testing.assert_close(update, hidden[layer + 1][:end] - hidden[layer][:end],
                                           atol=1e-5, rtol=1e-4)
    assert f"batch size {len(lengths)}, bound by {len(lengths)} prompts" in caplog.text


def test_default_batch_follows_the_memory_budget(tiny_llama, monkeypatch):
    arch = capture_module.resolve_arch(tiny_llama.model)
    need = capture_memory._prompt_bytes(tiny_llama.model, arch, 50, 12)
    assert need > 50 * 12 * 64 * 4  # at least the 12 captured (T, D) slices in fp32
    monkeypatch.setattr(capture_memory, "_available_bytes", lambda: 4 * 3 * need + 3)
    batch, why = default_batch_size(tiny_llama.model, arch, tokens=50, captured=12)
    assert batch == 3 and "a quarter of the" in why  # 3 prompts fit, 512 // 50 tokens would
    monkeypatch.setattr(capture_memory, "_available_bytes", lambda: 2**40)
    batch, why = default_batch_size(tiny_llama.model, arch, tokens=50, captured=12)
    assert batch == 10 and "bound by 512 tokens a batch on CPU" in why
    assert default_batch_size(tiny_llama.model, arch, tokens=50, captured=12, limit=4)[0] == 4
    monkeypatch.setattr(capture_memory, "_available_bytes", lambda: need)
    assert default_batch_size(tiny_llama.model, arch, tokens=50, captured=12)[0] == 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * 2**30, 16 * 2**30))
    assert capture_memory._budget(torch.device("cuda", 0)) == (
        4 * 2**30, "half of the 8.0 GiB free on cuda:0")


def test_the_users_batch_size_wins(experiment, tiny_llama, monkeypatch, caplog):
    _responses(experiment, [12] * 50)
    sizes, real = [], capture_module.capture_records

    def counted(model, arch, records, *args, **kwargs):
        sizes.append(len(records))
        return real(model, arch, records, *args, **kwargs)

    monkeypatch.setattr(capture_module, "capture_records", counted)
    with caplog.at_level(logging.INFO, logger="residlab.inference.capture"):
        capture_prompt_set(experiment, SET, loaded=tiny_llama, batch_size=20)
    assert sizes == [20, 20, 10] and "batch size" not in caplog.text
    sizes.clear()
    capture_prompt_set(experiment, SET, loaded=tiny_llama)
    assert sizes == [42, 8]  # 512 tokens a batch on CPU: 42 prompts of 12 tokens
    with pytest.raises(UsageError, match="--batch-size 0"):
        capture_prompt_set(experiment, SET, loaded=tiny_llama, batch_size=0)


def test_a_capture_that_overflows_is_not_written_and_names_prompt_layer_component(
        experiment, tiny_llama_dir):
    token = 301  # in no other prompt: its embedding is far beyond the fp16 range
    _responses(experiment, [14, 16, 18], token=token, at=1)
    loaded = load_fp32(tiny_llama_dir)
    with torch.no_grad():
        loaded.model.model.embed_tokens.weight[token] *= 1e7
    with pytest.raises(UsageError) as error:
        capture_prompt_set(experiment, SET, loaded=loaded, dtype="fp16")
    message = str(error.value)
    assert "\n" not in message and "1 of 3 prompt(s) not written" in message
    assert "prompt '1', layer 0 residual (response tokens)" in message
    assert "--dtype bf16 or fp32" in message
    folder = experiment.raw_dir("base", SET)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["0.safetensors",
                                                                    "2.safetensors"]
    for path in folder.glob("*.safetensors"):
        raw = load_raw(path)
        assert all(torch.isfinite(t).all() for part in ("prompt", "response")
                   for comps in raw[part]["activations"].values() for t in comps.values())
    result = capture_prompt_set(experiment, SET, loaded=loaded, dtype="fp32",
                                skip_existing=True)  # in fp32 the same values fit
    assert [p.name for p in result.written] == ["0.safetensors", "1.safetensors",
                                                "2.safetensors"]  # other dtype: all again


def test_skip_existing_captures_again_a_file_holding_nan(experiment, tiny_llama, caplog):
    _responses(experiment, [10, 12, 14])
    capture_prompt_set(experiment, SET, loaded=tiny_llama, dtype="fp32", capture_mlp=True)
    path = experiment.raw_dir("base", SET) / "1.safetensors"
    with safe_open(str(path), framework="pt") as handle:  # as an older capture left it
        meta = json.loads(handle.metadata()["residlab"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    tensors["response.layer2.mlp_contribution"][0, 5] = float("nan")
    meta.pop("all_finite", None)
    save_file(tensors, str(path), metadata={"residlab": json.dumps(meta)})
    with caplog.at_level(logging.INFO, logger="residlab.inference.capture"):
        result = capture_prompt_set(experiment, SET, loaded=tiny_llama, dtype="fp32",
                                    capture_mlp=True, skip_existing=True)
    assert [p.name for p in result.written] == ["1.safetensors"] and result.skipped == 2
    assert "response.layer2.mlp_contribution holds NaN or inf" in caplog.text
    assert torch.isfinite(load_raw(path)["response"]["activations"][2]["mlp_contribution"]).all()


def test_progress_counts_prompts_from_where_it_resumes(experiment, tiny_llama, monkeypatch):
    _responses(experiment, [10] * 5)
    capture_prompt_set(experiment, SET, loaded=tiny_llama, batch_size=2)
    for name in ("1", "3"):
        (experiment.raw_dir("base", SET) / f"{name}.safetensors").unlink()
    calls = []

    class Recorder:
        def __init__(self, **kwargs):
            calls.append({**kwargs, "updates": []})

        def update(self, n):
            calls[-1]["updates"].append(n)

        def close(self):
            calls[-1]["closed"] = True

    monkeypatch.setattr(capture_module, "progress", Recorder)
    capture_prompt_set(experiment, SET, loaded=tiny_llama, batch_size=1, skip_existing=True)
    assert calls == [{"total": 5, "desc": "capture", "unit": "prompts", "initial": 3,
                      "updates": [1, 1], "closed": True}]


def test_a_rerun_that_keeps_every_file_rewrites_nothing(experiment, tiny_llama):
    _responses(experiment, [10, 12])
    capture_prompt_set(experiment, SET, loaded=tiny_llama, dtype="fp32")
    folder = experiment.raw_dir("base", SET)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    result = capture_prompt_set(experiment, SET, loaded=tiny_llama, dtype="fp32",
                                skip_existing=True)
    assert result.written == [] and result.skipped == 2
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
