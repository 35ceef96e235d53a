"""Trait vectors: methods on planted directions, evaluation, projection maths, calibration,
selection, steering, judges, and the pipeline on a tiny model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch
import yaml

from conftest import chat_ids
from residlab.cli import main
from residlab.experiments import load_experiment
from residlab.generation import generate_ids
from residlab.inference.calibrate import MassiveDimsFitter
from residlab.inference.project import project_tensor
from residlab.traits.methods import METHODS, evaluate, fit_direction, split_pairs
from residlab.traits.positions import parse_position, pool, position_slug
from residlab.traits.select import select_vectors
from residlab.traits.steer import SteerRow, pack_interventions
from residlab.traits.vectors import TraitVector, save_vector


def _planted(n=60, d=32, strength=5.0, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    scenario = rng.standard_normal((n, d)) * 2.0 + 5.0  # shared by the two sides of a pair
    pos = scenario + rng.standard_normal((n, d)) * 0.5 + strength * u
    neg = scenario + rng.standard_normal((n, d)) * 0.5 - strength * u
    return u, pos, neg


@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_recover_a_planted_direction(method):
    u, pos, neg = _planted()
    train, test = split_pairs(len(pos), 0.2, seed=1)
    direction = fit_direction(method, pos[train], neg[train])
    cosine = direction @ u / np.linalg.norm(direction)
    assert cosine > 0.95, cosine
    scores = evaluate(direction, (pos[train], neg[train]), (pos[test], neg[test]))
    assert scores.accuracy >= 0.95 and scores.effect_size > 3


def test_evaluate_against_numpy():
    rng = np.random.default_rng(4)
    pos, neg = rng.standard_normal((10, 5)) + 1, rng.standard_normal((10, 5))
    direction = rng.standard_normal(5)
    train, test = np.arange(7), np.arange(7, 10)
    scores = evaluate(direction, (pos[train], neg[train]), (pos[test], neg[test]))
    unit = direction / np.linalg.norm(direction)
    base = ((pos[train].mean(0) + neg[train].mean(0)) / 2) @ unit
    p, q = pos[test] @ unit, neg[test] @ unit
    pooled = np.sqrt((2 * p.var(ddof=1) + 2 * q.var(ddof=1)) / 4)
    assert scores.baseline == pytest.approx(base)
    assert scores.effect_size == pytest.approx((p.mean() - q.mean()) / pooled)
    assert scores.accuracy == pytest.approx(((p > base).sum() + (q <= base).sum()) / 6)


def test_split_pairs():
    train, test = split_pairs(44, 0.2, 0)
    assert len(test) == 9 and len(train) == 35 and not set(train) & set(test)
    assert np.array_equal(split_pairs(44, 0.2, 0)[1], test)


def test_positions():
    prompt, response = torch.arange(8.0)[:, None], torch.arange(10.0, 16.0)[:, None]
    assert pool(prompt, response, "response[:5]").item() == 12.0
    assert pool(prompt, response, "response").item() == 12.5
    assert pool(prompt, response, "prompt[-1]").item() == 7.0
    assert pool(prompt, response, "all").item() == pytest.approx((28 + 75) / 14)
    assert position_slug("response[:5]") == "response__5"
    with pytest.raises(ValueError, match="not understood"):
        parse_position("middle")


def test_projection_equals_numpy():
    rng = np.random.default_rng(2)
    h, v = rng.standard_normal((7, 16)).astype(np.float32), rng.standard_normal(16)
    unit = torch.tensor(v / np.linalg.norm(v), dtype=torch.float32)
    out = project_tensor(torch.from_numpy(h), unit, baseline=0.25, massive=[3, 9])
    expected = h @ (v / np.linalg.norm(v))
    norms = np.linalg.norm(h, axis=1)
    np.testing.assert_allclose(out["projections"], expected - 0.25, atol=1e-5)
    np.testing.assert_allclose(out["norms"], norms, atol=1e-5)
    np.testing.assert_allclose(out["cosine"], expected / norms, atol=1e-5)
    cleaned = h.copy()
    cleaned[:, [3, 9]] = 0
    np.testing.assert_allclose(out["clean"]["projections"],
                               cleaned @ (v / np.linalg.norm(v)) - 0.25, atol=1e-5)
    np.testing.assert_allclose(out["clean"]["norms"], np.linalg.norm(cleaned, axis=1), atol=1e-4)
    np.testing.assert_allclose(out["massive_values"], h[:, [3, 9]], atol=1e-6)


def test_calibration_finds_planted_massive_dims():
    rng = np.random.default_rng(0)
    fitter = MassiveDimsFitter()
    for _ in range(4):
        x = rng.standard_normal((50, 64))
        x[:, 5] += 300.0
        x[:, 40] -= 120.0
        fitter.update(3, x)
    result = fitter.result(top_k=3)[3]
    assert result.dims[:2] == [5, 40] and result.count == 200
    assert result.ratio[0] > 100 and result.values[1] == pytest.approx(-120, abs=1)


# --- experiment fixtures ----------------------------------------------------------------

@pytest.fixture
def experiment(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    cpu = {"model": str(tiny_llama_dir), "dtype": "fp32", "device": "cpu"}
    (tmp_path / "experiments" / "t").mkdir(parents=True)
    (tmp_path / "experiments" / "t" / "config.yaml").write_text(yaml.safe_dump(
        {"model_variants": {"base": cpu}, "defaults": {"application": "base",
                                                      "extraction": "base"}}))
    trait = tmp_path / "datasets" / "traits" / "test" / "cheer"
    trait.mkdir(parents=True)
    words = ["tides", "bread", "poem", "python", "paris", "autumn", "fox", "yeast"]
    (trait / "positive.txt").write_text("\n".join(f"I love the {w}! It is great" for w in words))
    (trait / "negative.txt").write_text("\n".join(f"I hate the {w}. It is awful" for w in words))
    (trait / "definition.txt").write_text("High: cheerful. Low: gloomy.")
    (trait / "steering.json").write_text(json.dumps({"questions": ["How are you?", "Hi"]}))
    return load_experiment("t")


def _store(experiment, layer, effect, method="mean_diff", d=64):
    vector = torch.zeros(d)
    vector[layer] = 1.0
    save_vector(experiment, TraitVector("test/cheer", "base", "response[:5]", "residual",
                                        method, layer, vector,
                                        {"effect_size": effect, "accuracy": 1.0,
                                         "baseline": 0.5}))


def test_selection_uses_effect_size_then_steering(experiment):
    for layer, effect in [(0, 0.5), (1, 2.0), (3, 1.0)]:
        _store(experiment, layer, effect)
    (best,) = select_vectors(experiment, "test/cheer", variant="base")
    assert best.vector.layer == 1 and "effect size" in best.reason
    (offset,) = select_vectors(experiment, "test/cheer", variant="base", layer="best+1")
    assert offset.vector.layer == 1 or offset.vector.layer == 3  # 2 has no vector: nearest
    assert "snapped from 2" in offset.reason
    rows = []
    for layer, coef, trait, coherence in [(None, 0, 40, 90), (0, 8, 90, 50), (3, 8, 70, 85),
                                          (1, 8, 45, 95), (3, -8, 30, 90)]:
        rows += [{"method": "mean_diff", "position": "response[:5]", "component": "residual",
                  "vector_variant": "base", "layer": layer, "coefficient": coef,
                  "question": q, "answer": "", "trait_score": trait,
                  "coherence_score": coherence} for q in ("a", "b")]
    folder = experiment.path / "steering" / "test" / "cheer" / "base"
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (chosen,) = select_vectors(experiment, "test/cheer", variant="base")
    # layer 0 gains most but is incoherent; layer 3 at +8 gains 30 with coherence 85
    assert chosen.vector.layer == 3 and "+30.0" in chosen.reason
    (fixed,) = select_vectors(experiment, "test/cheer", variant="base", layer=2)
    assert fixed.vector.layer in (1, 3)
    (captured,) = select_vectors(experiment, "test/cheer", variant="base", available_layers=[0])
    assert captured.vector.layer == 0


def test_zero_coefficient_rows_are_plain_generation(tiny_llama):
    model, tokenizer = tiny_llama.model, tiny_llama.tokenizer
    unit = torch.nn.functional.normalize(torch.randn(64), dim=0)
    rows = [SteerRow("How are you?", None, 0.0), SteerRow("How are you?", 2, 30.0),
            SteerRow("Tell me a story", 1, -30.0), SteerRow("Tell me a story", None, 0.0)]
    prompts = chat_ids(tokenizer, [r.question for r in rows])
    units = {1: unit, 2: unit}
    packed = generate_ids(model, tokenizer, prompts, max_new_tokens=8,
                          interventions=pack_interventions(rows, units))
    plain = generate_ids(model, tokenizer, prompts, max_new_tokens=8)
    assert packed[0] == plain[0] and packed[3] == plain[3]
    for i in (1, 2):  # each steered row equals its own single-row run
        alone = generate_ids(model, tokenizer, [prompts[i]], max_new_tokens=8,
                             interventions=pack_interventions([rows[i]], units))
        assert packed[i] == alone[0]
    assert pack_interventions([rows[0], rows[3]], units) == []


def test_local_judge_matches_digit_softmax(tiny_llama):
    from residlab.prompts import template_ids
    from residlab.traits.judge import LocalJudge

    judge = LocalJudge(tiny_llama)
    prompts = ["Rate this: great answer", "Rate: bad"]
    scores = judge.score(prompts)
    for prompt, score in zip(prompts, scores, strict=True):
        ids = template_ids(tiny_llama.tokenizer, [{"role": "user", "content": prompt}])[1]
        with torch.no_grad():
            logits = tiny_llama.model(torch.tensor([ids])).logits[0, -1]
        probs = torch.softmax(logits[judge.digit_ids], dim=0)
        expected = float((probs * torch.arange(10.0)).sum() * 100 / 9)
        assert score == pytest.approx(expected, abs=1e-3) and 0 <= score <= 100


class _FakeJudge(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        reply = "73" if "trait" in text else "88 out of 100"
        payload = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_endpoint():
    server = HTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_pipeline_extract_steer_calibrate_project(experiment, fake_endpoint, capsys):
    from residlab.inference.raw import load_raw

    assert main(["extract", "--experiment", "t", "--traits", "test/cheer", "--max-new-tokens",
                 "4", "--layers", "1-3"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out
    folder = experiment.path / "extraction" / "test" / "cheer" / "base" / "vectors"
    for method in METHODS:
        meta = json.loads((folder / "response__5" / "residual" / method / "metadata.json")
                          .read_text())
        assert [row["layer"] for row in meta["layers"]] == [1, 2, 3]
        assert all(0 <= row["accuracy"] <= 1 for row in meta["layers"])
    # Steering with an unreachable judge keeps the answers; --rescore then scores them.
    steer = ["steer", "--experiment", "t", "--trait", "test/cheer", "--layers", "2",
             "--coefficients", "0,5,-5", "--max-new-tokens", "4", "--judge-model", "m"]
    assert main([*steer, "--judge-url", "http://127.0.0.1:9/v1"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "--rescore" in err
    steering = experiment.path / "steering" / "test" / "cheer" / "base"
    (answers,) = (steering / "answers").glob("*.jsonl")
    assert len(answers.read_text().splitlines()) == 2 * 3
    assert main([*steer, "--judge-url", fake_endpoint, "--rescore"]) == 0
    results = [json.loads(x) for x in (steering / "results.jsonl").read_text().splitlines()]
    assert {r["trait_score"] for r in results} == {73.0}
    assert {r["coherence_score"] for r in results} == {88.0}
    # Projection needs calibration unless told otherwise.
    assert main(["responses", "--experiment", "t", "--prompt-set", "baseline",
                 "--max-new-tokens", "4"]) == 0
    assert main(["capture", "--experiment", "t", "--prompt-set", "baseline", "--dtype",
                 "fp32"]) == 0
    assert main(["project", "--experiment", "t", "--prompt-set", "baseline"]) == 2
    assert "calibration missing" in capsys.readouterr().err
    assert main(["calibrate", "--experiment", "t", "--top-k", "4"]) == 0
    assert main(["project", "--experiment", "t", "--prompt-set", "baseline", "--layer", "2",
                 "--method", "probe", "--centered", "--clean-massive-dims"]) == 0
    capsys.readouterr()
    raw = load_raw(experiment.raw_dir("base", "baseline") / "1.safetensors")
    result = json.loads((experiment.inference_dir("base") / "projections" / "test" / "cheer"
                         / "baseline" / "1.json").read_text())
    source = result["metadata"]["vector_source"]
    assert (source["layer"], source["method"], source["trait"]) == (2, "probe", "test/cheer")
    from safetensors.torch import load_file

    vector = load_file(str(folder / "response__5" / "residual" / "probe" /
                           "layer2.safetensors"))["vector"].double().numpy()
    unit = vector / np.linalg.norm(vector)
    h = raw["response"]["activations"][2]["residual"].double().numpy()
    baseline = result["metadata"]["baseline"]
    np.testing.assert_allclose(result["projections"]["response"], h @ unit - baseline, atol=1e-4)
    np.testing.assert_allclose(result["norms"]["response"], np.linalg.norm(h, axis=1), atol=1e-4)
    assert len(result["massive_dims"]["dims"]) == 4 and "clean" in result
    # Steering in responses.
    assert main(["responses", "--experiment", "t", "--prompt-set", "baseline", "--limit", "1",
                 "--output-suffix", "steered", "--steer", "test/cheer:2:40",
                 "--max-new-tokens", "4"]) == 0
    steered = json.loads((experiment.responses_dir("base", "baseline_steered") / "1.json")
                         .read_text())
    assert steered["tags"] == ["steer:test/cheer:2:40"]


def test_trait_bad_inputs(experiment, tmp_path, capsys):
    trait = tmp_path / "datasets" / "traits" / "test" / "lopsided"
    trait.mkdir(parents=True)
    (trait / "positive.txt").write_text("a\nb\nc\nd\ne\nf\n")
    (trait / "negative.txt").write_text("a\nb\n")
    assert main(["extract", "--experiment", "t", "--traits", "test/lopsided"]) == 2
    assert "has 6 lines but negative.txt has 2" in capsys.readouterr().err
    assert main(["extract", "--experiment", "t", "--traits", "test/nothing"]) == 2
    assert "no data for trait 'test/nothing'" in capsys.readouterr().err
    assert main(["steer", "--experiment", "t", "--trait", "test/cheer", "--layers", "2",
                 "--coefficients", "4", "--judge-url", "http://127.0.0.1:9", "--judge-model",
                 "m"]) == 2
    assert "no mean_diff vector for test/cheer at layer 2" in capsys.readouterr().err
    assert main(["steer", "--experiment", "t", "--trait", "test/cheer", "--layers", "2",
                 "--coefficients", "4,x"]) == 2
    assert "--coefficients" in (err := capsys.readouterr().err) and "'x'" in err
    assert main(["steer", "--experiment", "t", "--trait", "test/cheer"]) == 2
    assert "give --layers" in capsys.readouterr().err
    _store(experiment, 1, 1.0, d=10)  # a vector made for another model
    assert main(["responses", "--experiment", "t", "--prompt-set", "baseline", "--steer",
                 "test/cheer:1:4"]) == 2
    assert "hidden size" in capsys.readouterr().err


def test_projecting_many_traits_equals_one_at_a_time():
    from residlab.inference.project import project_many

    torch.manual_seed(0)
    hidden, units = torch.randn(9, 16), torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    many = project_many(hidden, units, [0.0, 1.0, -2.0], massive=[1, 5])
    for i in range(3):
        one = project_tensor(hidden, units[i], [0.0, 1.0, -2.0][i], massive=[1, 5])
        for key in ("projections", "norms", "cosine"):
            np.testing.assert_allclose(many[i][key], one[key], atol=1e-6)
            assert many[i][key].flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(many[i]["clean"]["projections"], one["clean"]["projections"],
                                   atol=1e-6)


def test_calibration_records_the_contributions_norms(experiment):
    """attn_mean_norm / mlp_mean_norm: the mean token norm of each block's attention and MLP
    outputs over the response tokens, against hooks put on those modules by hand."""
    from residlab.experiments import load_variant
    from residlab.inference.calibrate import run_calibration

    path = run_calibration(experiment, max_new_tokens=4, batch_size=2)
    layers = json.loads(path.read_text())["layers"]
    loaded = load_variant(experiment, "base")
    blocks = loaded.model.model.layers
    sums = {(kind, i): [0.0, 0] for kind in ("attn", "mlp") for i in range(len(blocks))}
    for response in sorted(experiment.responses_dir("base", "calibration").glob("*.json")):
        record = json.loads(response.read_text())
        seen: dict = {}
        handles = [module.register_forward_hook(
            lambda m, args, out, key=(kind, i), seen=seen: seen.__setitem__(
                key, out[0] if isinstance(out, tuple) else out))
            for i, block in enumerate(blocks)
            for kind, module in (("attn", block.self_attn), ("mlp", block.mlp))]
        with torch.no_grad():
            loaded.model(torch.tensor([record["token_ids"]]))
        for handle in handles:
            handle.remove()
        for key, value in seen.items():
            norms = value[0, record["prompt_end"]:].double().norm(dim=-1)  # (n_response,)
            sums[key][0] += float(norms.sum())
            sums[key][1] += norms.numel()
    for (kind, i), (total, count) in sums.items():
        assert layers[str(i)][f"{kind}_mean_norm"] == pytest.approx(total / count, rel=1e-4)
