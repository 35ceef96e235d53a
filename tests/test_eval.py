"""Log-prob evaluation against plain forwards; cross-tokenizer path; resume; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from residlab.arch import resolve_arch
from residlab.cli import main
from residlab.config import NoisingConfig
from residlab.noising.eval import EVAL_FILE, run_eval
from residlab.noising.generate import run_generate
from residlab.noising.runs import RunDir
from residlab.scoring import ScoreRow, score_rows


def _config(tmp_path, model_dir, **changes) -> NoisingConfig:
    base = dict(model_name=str(model_dir), dtype="fp32", device="cpu", num_prompts=4,
                max_prompt_len=64, batch_size=5, max_new_tokens=7, layer_index=1,
                noise_norms=[0.0, 3.0], num_noise_vectors=2, seed=3,
                output_dir=str(tmp_path / "out"))
    return NoisingConfig(**{**base, **changes})


def _plain_logprobs(model, ids: list[int], start: int) -> list[float]:
    """Oracle: one unpadded forward, full log_softmax, gather."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # (T, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[t - 1, ids[t]].item() for t in range(start, len(ids))]


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_llama, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = _config(tmp, tiny_llama_dir)
    run_dir = run_generate(cfg, loaded=tiny_llama)
    out, skipped = run_eval(cfg, run_dir, loaded=tiny_llama)
    return cfg, run_dir, out, skipped


def test_eval_matches_plain_forward(scored_run, tiny_llama):
    cfg, run_dir, out, skipped = scored_run
    assert not skipped
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 4 * 2 * 2
    gens = {(g["noise_id"], g["noise_scale"], g["prompt_index"]): g
            for path in RunDir(run_dir).gens_files()
            for g in map(json.loads, path.read_text().splitlines())}
    for record in records:
        gen = gens[record["noise_id"], record["noise_scale"], record["prompt_index"]]
        ids = gen["prompt_token_ids"] + gen["response_token_ids"]
        expected = _plain_logprobs(tiny_llama.model, ids, len(gen["prompt_token_ids"]))
        assert record["per_token_logprobs"] == pytest.approx(expected, abs=1e-4)
        assert record["total_logprob"] == pytest.approx(sum(expected), abs=1e-3)
        assert record["n_tokens"] == len(gen["response_token_ids"])
        assert record["mean_logprob"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)
        assert record["scoring"] == "exact_ids"
        assert record["assistant_text"] == gen["assistant_text"]
        assert len(record["tokens"]) == record["n_tokens"]


def test_rerun_adds_nothing_and_fills_gaps(scored_run, tiny_llama):
    cfg, run_dir, out, _ = scored_run
    before = out.read_text()
    run_eval(cfg, run_dir, loaded=tiny_llama)
    assert out.read_text() == before
    lines = before.splitlines()
    out.write_text("\n".join(lines[:5]) + "\n")  # lose most records
    run_eval(cfg, run_dir, loaded=tiny_llama)
    again = [json.loads(x) for x in out.read_text().splitlines()]
    original = [json.loads(x) for x in lines]
    assert [r["prompt_index"] for r in again] == [r["prompt_index"] for r in original]
    for new, old in zip(again, original, strict=True):
        assert new["per_token_logprobs"] == pytest.approx(old["per_token_logprobs"], abs=1e-5)
        assert (new["noise_id"], new["noise_scale"]) == (old["noise_id"], old["noise_scale"])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2", "tiny_gemma2"])
def test_batched_scoring_equals_unbatched(request, fixture):
    loaded = request.getfixturevalue(fixture)
    arch = resolve_arch(loaded.model)
    torch.manual_seed(0)
    rows = [ScoreRow(torch.randint(3, 300, (n,)).tolist(), s, e)
            for n, s, e in [(12, 4, 12), (5, 1, 5), (20, 19, 20), (9, 3, 7)]]
    batched = score_rows(loaded.model, arch, rows, pad_id=0, chunk=3)
    for row, values in zip(rows, batched, strict=True):
        alone = score_rows(loaded.model, arch, [row], pad_id=0)[0]
        assert values == pytest.approx(alone, abs=1e-5)
        oracle = _plain_logprobs(loaded.model, list(row.token_ids), row.start)
        assert values == pytest.approx(oracle[: row.end - row.start], abs=1e-4)


def test_no_score_eos_drops_the_stop_token(tmp_path, tiny_llama, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir)
    run_dir = run_generate(cfg, loaded=tiny_llama)
    # Make one generation end with the stop token, as a chat model's would.
    path = RunDir(run_dir).gens_file(0)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[0]["response_token_ids"].append(tiny_llama.tokenizer.eos_token_id)
    lines[0]["finish_reason"] = "stop"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with_eos, _ = run_eval(cfg, run_dir, loaded=tiny_llama)
    first = json.loads(with_eos.read_text().splitlines()[0])
    assert first["n_tokens"] == len(lines[0]["response_token_ids"])
    with_eos.unlink()
    without, _ = run_eval(cfg, run_dir, loaded=tiny_llama, score_eos=False)
    first = json.loads(without.read_text().splitlines()[0])
    assert first["n_tokens"] == len(lines[0]["response_token_ids"]) - 1


def _other_reference(tmp_path):
    """A tiny Llama with its own tokenizer and chat template (a different family of ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="[unk]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["[unk]", "[pad]", "[end]"])
    core.train_from_iterator(["hello world this is another tokenizer entirely"] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="[end]",
                                        pad_token="[pad]", unk_token="[unk]")
    tokenizer.chat_template = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}"
                               "[end]\n{% endfor %}{% if add_generation_prompt %}### assistant: "
                               "{% endif %}")
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         vocab_size=len(tokenizer), pad_token_id=1,
                                         eos_token_id=2, bos_token_id=2))
    model.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    return tmp_path / "other"


def test_cross_tokenizer_path(tmp_path, tiny_llama, tiny_llama_dir):
    from residlab.models import load_model

    cfg = _config(tmp_path, tiny_llama_dir, num_prompts=2, noise_norms=[0.0])
    run_dir = run_generate(cfg, loaded=tiny_llama)
    answers = ["hello world this is another", "this tokenizer is entirely hello"]
    for path in RunDir(run_dir).gens_files():  # answers the other tokenizer can spell
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        for line, answer in zip(lines, answers, strict=True):
            line["assistant_text"], line["finish_reason"] = answer, "stop"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    other = _other_reference(tmp_path)
    reference = load_model(str(other), dtype="fp32", device="cpu")
    out, _ = run_eval(cfg.model_copy(update={"reference_model_name": str(other)}), run_dir,
                      loaded=reference)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["scoring"] for r in records} == {"retokenized"}
    tok = reference.tokenizer
    for record in records:
        full = tok.apply_chat_template(
            [*record["messages"], {"role": "assistant", "content": record["assistant_text"]}],
            tokenize=False)
        ids = tok(full, add_special_tokens=False)["input_ids"]
        n = record["n_tokens"]
        # The scored ids are the assistant span (+ the end token): they spell the answer.
        assert record["tokens"][-1] == "[end]"
        assert "".join(record["tokens"][:-1]) == record["assistant_text"].replace(" ", "")
        start = next(s for s in range(len(ids) - n + 1)
                     if [tok.decode([i]) for i in ids[s:s + n]] == record["tokens"])
        oracle = _plain_logprobs(reference.model, ids[: start + n], start)
        assert record["per_token_logprobs"] == pytest.approx(oracle, abs=1e-4)


def test_eval_bad_input(tmp_path, capsys, tiny_llama, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(cfg.model_dump()))
    assert main(["noise", "eval", "--config", str(config), "--run_dir", str(tmp_path)]) == 2
    assert "not a noising run directory" in capsys.readouterr().err
    run_dir = run_generate(cfg, loaded=tiny_llama)
    gens = RunDir(run_dir).gens_files()
    good = gens[0].read_text()
    gens[0].write_text(good + '{"noise_id": 0, "noise_sca\n')  # a truncated line
    code = main(["noise", "eval", "--config", str(config), "--run_dir", str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "skipped 1 unreadable" in err and "gens_noise_0000.jsonl:9" in err
    assert len((run_dir / EVAL_FILE).read_text().splitlines()) == 16  # the rest were scored
    assert main(["noise", "eval", "--config", str(config), "--run_dir", str(run_dir),
                 "--reference_model_name", str(tmp_path / "missing-model")]) == 2
    err = capsys.readouterr().err
    assert "missing-model" in err and "not found" in err
    for path in gens:
        path.write_text("")
    (run_dir / EVAL_FILE).unlink()
    assert main(["noise", "eval", "--config", str(config), "--run_dir", str(run_dir)]) == 2
    assert "no generations to score" in capsys.readouterr().err
    assert not (run_dir / EVAL_FILE).exists()


def test_eval_without_config_uses_the_runs_own(tmp_path, capsys, tiny_llama, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir, num_prompts=2, noise_norms=[0.0, 1.0])
    run_dir = run_generate(cfg, loaded=tiny_llama)
    assert main(["noise", "eval", "--run_dir", str(run_dir), "--batch_size", "3"]) == 0
    out = capsys.readouterr().out
    assert "mean log-prob/token" in out and f"scores: {run_dir / EVAL_FILE}" in out
    assert len((run_dir / EVAL_FILE).read_text().splitlines()) == 2 * 2 * 2


def _plant_stop(run_dir, tokenizer) -> dict:
    """End the first generation with the stop token, as a chat model's would."""
    path = RunDir(run_dir).gens_file(0)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[0]["response_token_ids"].append(tokenizer.eos_token_id)
    lines[0]["finish_reason"] = "stop"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines[0]


def _by_key(path) -> dict:
    return {(r["noise_id"], r["noise_scale"], r["prompt_index"]): r
            for r in map(json.loads, path.read_text().splitlines())}


def test_rerun_with_other_settings_rescores(tmp_path, caplog, tiny_llama, tiny_llama_dir,
                                            tiny_gpt2):
    cfg = _config(tmp_path, tiny_llama_dir, num_prompts=2)
    run_dir = run_generate(cfg, loaded=tiny_llama)
    stopped = _plant_stop(run_dir, tiny_llama.tokenizer)
    key = (stopped["noise_id"], stopped["noise_scale"], stopped["prompt_index"])
    out, _ = run_eval(cfg, run_dir, loaded=tiny_llama)
    assert _by_key(out)[key]["n_tokens"] == len(stopped["response_token_ids"])
    with caplog.at_level("WARNING", logger="residlab.noising.eval"):
        run_eval(cfg, run_dir, loaded=tiny_llama, score_eos=False)
    assert "rescoring 8 record(s)" in caplog.text and "score_eos True -> False" in caplog.text
    records = _by_key(out)
    assert records[key]["n_tokens"] == len(stopped["response_token_ids"]) - 1
    assert all(r["settings"]["score_eos"] is False for r in records.values())
    # Another reference model (same tokenizer, so exact ids): rescored, not refused.
    run_eval(cfg, run_dir, loaded=tiny_gpt2, score_eos=False)
    gens = {(g["noise_id"], g["noise_scale"], g["prompt_index"]): g
            for path in RunDir(run_dir).gens_files()
            for g in map(json.loads, path.read_text().splitlines())}
    for k, record in _by_key(out).items():
        ids = gens[k]["prompt_token_ids"] + gens[k]["response_token_ids"][:record["n_tokens"]]
        expected = _plain_logprobs(tiny_gpt2.model, ids, len(gens[k]["prompt_token_ids"]))
        assert record["per_token_logprobs"] == pytest.approx(expected, abs=1e-4)
        assert record["reference_model"] == tiny_gpt2.name


def test_empty_span_has_no_score(tmp_path, tiny_llama, tiny_llama_dir):
    import numpy as np

    from residlab.noising.eval import summarize
    from residlab.noising.stats import scale_quantiles, vector_means

    cfg = _config(tmp_path, tiny_llama_dir, num_prompts=2)
    run_dir = run_generate(cfg, loaded=tiny_llama)
    path = RunDir(run_dir).gens_file(0)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[-1]["response_token_ids"] = [tiny_llama.tokenizer.eos_token_id]  # stopped at once
    lines[-1]["finish_reason"] = "stop"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out, _ = run_eval(cfg, run_dir, loaded=tiny_llama, score_eos=False)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    empty = [r for r in records if r["n_tokens"] == 0]
    assert len(empty) == 1 and empty[0]["mean_logprob"] is None
    assert empty[0]["total_logprob"] is None
    scored = [r for r in records if r["n_tokens"]]
    for row in scale_quantiles(records):  # oracle: numpy over the records that have a score
        values = [r["mean_logprob"] for r in scored if r["noise_scale"] == row["scale"]]
        assert row["n"] == len(values) and row["mean"] == pytest.approx(np.mean(values))
    means = vector_means(records)
    assert means[0][empty[0]["noise_scale"]] == pytest.approx(np.mean(
        [r["mean_logprob"] for r in scored
         if r["noise_id"] == 0 and r["noise_scale"] == empty[0]["noise_scale"]]))
    assert "1 generation(s) with no token to score" in summarize(records)


def test_killed_eval_resumes_from_the_partial_file(tmp_path, monkeypatch, tiny_llama,
                                                   tiny_llama_dir):
    from residlab.noising import eval as noising_eval

    cfg = _config(tmp_path, tiny_llama_dir, batch_size=3)
    run_dir = run_generate(cfg, loaded=tiny_llama)
    real, calls = noising_eval.score_rows, []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 3 and kill:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(noising_eval, "score_rows", dies_on_third_batch)
    kill = True
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, run_dir, loaded=tiny_llama)
    partial = run_dir / "eval_logprobs.partial.jsonl"
    assert not (run_dir / EVAL_FILE).exists()  # the output is written once, at the end
    assert len(partial.read_text().splitlines()) == 6  # two finished batches
    with partial.open("a") as handle:
        handle.write('{"noise_id": 0, "noise_sc')  # a kill in the middle of a write
    calls.clear()
    kill = False
    out, _ = run_eval(cfg, run_dir, loaded=tiny_llama)
    assert sum(calls) == 16 - 6 and not partial.exists()
    records = [json.loads(x) for x in out.read_text().splitlines()]
    keys = [(r["noise_id"], r["noise_scale"], r["prompt_index"]) for r in records]
    assert len(keys) == len(set(keys)) == 16 and keys == sorted(keys)
    monkeypatch.setattr(noising_eval, "score_rows", real)
    (run_dir / EVAL_FILE).rename(tmp_path / "resumed.jsonl")
    fresh, _ = run_eval(cfg, run_dir, loaded=tiny_llama)  # oracle: one uninterrupted run
    once = [json.loads(x) for x in fresh.read_text().splitlines()]
    for a, b in zip(records, once, strict=True):
        assert a["per_token_logprobs"] == pytest.approx(b["per_token_logprobs"], abs=1e-6)


@pytest.mark.parametrize("fixture_dir", ["tiny_llama_dir", "tiny_gemma2_dir"])
def test_bf16_scores_use_a_float32_head(request, fixture_dir):
    """Oracle: the bf16 model's last hidden states, then the unembedding and log-softmax in
    float64 (with the family's soft-cap). A bf16 head is off by rounding; ours is not."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture_dir),
                                                 dtype=torch.bfloat16).eval()
    model.requires_grad_(False)
    arch = resolve_arch(model)
    with torch.no_grad():  # large logits, as in real models: bf16 rounding shows
        model.get_output_embeddings().weight.mul_(20)
    torch.manual_seed(0)
    rows = [ScoreRow(torch.randint(3, 300, (16,)).tolist(), 4, 16) for _ in range(3)]
    ours = score_rows(model, arch, rows, pad_id=0)
    weight = model.get_output_embeddings().weight.double().numpy()  # (V, D)
    cap = arch.logit_softcap
    for row, values in zip(rows, ours, strict=True):
        ids = torch.tensor([row.token_ids])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        hidden = out.hidden_states[-1][0].double().numpy()  # (T, D), final norm applied
        logits = hidden @ weight.T  # (T, V)
        logits = np.tanh(logits / cap) * cap if cap else logits
        logprobs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        positions = range(row.start - 1, row.end - 1)
        oracle = np.array([logprobs[p, row.token_ids[p + 1]] for p in positions])
        bf16 = torch.log_softmax(out.logits[0].float(), -1).numpy()  # (T, V) bf16 head
        bf16 = np.array([bf16[p, row.token_ids[p + 1]] for p in positions])
        error = np.abs(np.array(values) - oracle).max()
        assert error < 5e-5 and np.abs(bf16 - oracle).max() > 100 * error
