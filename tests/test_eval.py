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
    assert "cannot load model" in capsys.readouterr().err
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
