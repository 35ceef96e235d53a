"""The dashboard's part-2 API (Extraction, Steering, Model Analysis, Model Diff spans, Noising)
on small files written here (no model).

Oracles: plain Python over results.jsonl for the best trait score per layer, ``select_vectors``
for the best vector, numpy for the calibration cosines and the log-prob means, the files'
clauses sorted in the test, and ``residlab noise eval``'s printed summary for the noising
numbers. Hostile strings come back verbatim; noising runs are found by listing only.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from residlab.experiments import load_experiment
from residlab.noising.eval import summarize
from residlab.server.app import create_app
from residlab.server.dashboard.data import DashboardData
from residlab.server.state import ServerState
from residlab.traits.select import select_vectors
from residlab.traits.vectors import TraitVector, save_vector
from test_dashboard_api import LOCAL, _b64, _response, _write, build

D = 16
JOY = "emotion/joy"
EVIL_TEXT = "<script>window.__x=1</script>"
DEFINITION = f"Joy {EVIL_TEXT}\nScore 0-100."
QUESTIONS = ["Q1?", f"Q2 {EVIL_TEXT}?", "Q3?"]
SETTING = {"position": "response[:5]", "component": "residual", "vector_variant": "base",
           "positions": "all", "max_new_tokens": 8, "judge": "local:test"}


# --- the files -----------------------------------------------------------------------------------

def _stats(method: str, layer: int) -> dict:
    rng = np.random.default_rng(layer * 10 + len(method))
    return {"accuracy": float(rng.random()), "effect_size": float(rng.random() * 3),
            "baseline": float(rng.normal()), "norm": float(rng.random() + 1), "n_train": 8,
            "n_test": 2, "flipped": bool(layer % 2)}


def _extraction(demo: Path) -> None:
    exp = load_experiment("demo", demo.parent)
    for method, layer in (("mean_diff", 1), ("mean_diff", 2), ("mean_diff", 3), ("probe", 1),
                          ("probe", 3)):
        vector = torch.randn(D, generator=torch.Generator().manual_seed(layer))
        save_vector(exp, TraitVector(JOY, "base", "response[:5]", "residual", method, layer,
                                     vector, _stats(method, layer)))
    folder = demo / "extraction" / JOY / "base"
    _write(folder / "vectors/response__5/residual/probe/metadata.json", {"test_pairs": [1]})
    lines = [{"text": f"pos {i} {EVIL_TEXT}", "completion": f" yes {i}"} for i in range(3)]
    negative = [{"text": f"neg {i}", "completion": f" no <b>{i}</b>"} for i in range(2)]
    _write(folder / "completions.json", {"max_new_tokens": 4, "positive": lines,
                                         "negative": negative})
    _write(folder / "logit_lens.json", {
        "trait": JOY, "variant": "base", "top_k": 2, "vocab_size": 50, "filter_common": False,
        "common": {"toward": [], "away": []},
        "vectors": [{"method": "probe", "layer": 1, "position": "response[:5]",
                     "component": "residual", "norm": 2.5,
                     "toward": [{"token": EVIL_TEXT, "token_id": 3, "logit": 0.5}],
                     "away": [{"token": " sad", "token_id": 4, "logit": -0.5}]}]})


def _steering_rows() -> list[dict]:
    rng = np.random.default_rng(7)
    rows = []
    for method in ("mean_diff", "probe"):
        for layer, coefficient in [(None, 0.0), (1, 4.0), (1, 8.0), (1, -8.0), (2, 4.0),
                                   (2, 8.0), (3, 8.0), (3, -4.0)]:
            for question in QUESTIONS:
                rows.append({"method": method, **SETTING, "question": question,
                             "layer": layer, "coefficient": coefficient,
                             "answer": f"{method} L{layer} c{coefficient} {question} <i>",
                             "trait_score": float(rng.uniform(0, 100)),
                             "coherence_score": float(rng.uniform(40, 100)),
                             "judge": SETTING["judge"]})
    return rows


def _steering(root: Path, demo: Path) -> list[dict]:
    rows = _steering_rows()
    path = demo / "steering" / JOY / "base" / "results.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trait = root / "datasets" / "traits" / JOY
    trait.mkdir(parents=True)
    (trait / "definition.txt").write_text(DEFINITION)
    (trait / "positive.txt").write_text("a\n")
    return rows


def _calibration(demo: Path) -> dict:
    rng = np.random.default_rng(3)
    layers = {}
    tops = [[3, 5, 7, 1, 2, 9], [5, 3, 7, 0, 4, 9], [3, 5, 0, 1, 2, 7], [5, 3, 9, 8, 6, 7]]
    for i, dims in enumerate(tops):
        layers[str(i)] = {"dims": dims, "values": [2.0] * 6, "ratio": [5.0 - j for j in range(6)],
                          "mean_norm": 10.0 + i, "n_tokens": 5,
                          "mean": rng.normal(size=D).tolist()}
    doc = {"variant": "base", "prompt_set": "calibration", "top_k": 6, "model": "m",
           "layers": layers}
    _write(demo / "inference/base/massive_activations/calibration.json", doc)
    return doc


def _model_diff(demo: Path) -> None:
    folder = demo / "model_diff" / "base_vs_tuned"
    _write(folder / "hostile" / "results.json", {
        "n_prompts": 3, "component": "residual", "vector_variant": "base",
        "traits": {JOY: {"method": "probe", "position": "response[:5]", "component": "residual",
                         "selection": f"sel {EVIL_TEXT}", "layers": [1, 2],
                         "per_layer_cosine_sim": [0.1, -0.2], "per_layer_effect_size": [0.5, 1.5],
                         "per_layer_paired_effect_size": [0.7, 2.0],
                         "per_layer_mean_a": [1.0, 2.0], "per_layer_mean_b": [1.5, 3.0],
                         "per_layer_std_a": [0.3, 0.4], "per_layer_std_b": [0.5, 0.6],
                         "peak_layer": 2, "peak_effect_size": 1.5,
                         "peak_paired_effect_size": 2.0}}})
    rng = np.random.default_rng(5)
    for prompt_id in ("1", "2", "10"):
        tokens = _response(prompt_id)["tokens"][len(_response(prompt_id)["tokens"]) - 5:]
        if prompt_id == "1":
            tokens = _response("1")["tokens"][3:]
        n = len(tokens)
        delta, kl = rng.normal(size=n).tolist(), rng.random(n).tolist()
        _write(folder / "logprobs" / "hostile" / f"{prompt_id}.json",
               {"prompt_id": prompt_id, "tokens": tokens, "delta": delta, "kl": kl})
        per_token = rng.normal(size=n).tolist()
        clauses = [{"text": "".join(tokens[:2]), "token_range": [0, 2],
                    "mean_delta": float(np.mean(per_token[:2])),
                    "max_delta": float(np.max(per_token[:2])), "n_tokens": 2},
                   {"text": "".join(tokens[2:]), "token_range": [2, n],
                    "mean_delta": float(np.mean(per_token[2:])),
                    "max_delta": float(np.max(per_token[2:])), "n_tokens": n - 2}]
        _write(folder / "per_token_diff" / JOY / "L2" / "hostile" / f"{prompt_id}.json",
               {"prompt_id": prompt_id, "tokens": tokens, "per_token_delta": per_token,
                "clauses": clauses})
    _write(folder / "per_token_diff" / JOY / "L2" / "hostile" / "aggregate.json", {"x": 1})


def _noising(root: Path) -> Path:
    out = root / "noising" / "outputs"
    rng = np.random.default_rng(11)
    for run in ("20260101-000000", "20260102-000000"):
        folder = out / run
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(
            {"model_name": "m", "layer_index": 3, "site": "resid_pre", "positions": "all",
             "noise_norms": [0.0, 8.0, 64.0], "num_noise_vectors": 3, "num_prompts": 4,
             "max_new_tokens": 4, "seed": 0, "do_sample": False, "shape_noise": False,
             "noise_shaping": {"shaped": False, "reason": EVIL_TEXT}}))
        records = [{"noise_id": v, "noise_scale": s, "prompt_index": p,
                    "mean_logprob": float(rng.normal(-1 - s / 32)),
                    "total_logprob": float(rng.normal(-4))}
                   for v in range(3) for s in (0.0, 8.0, 64.0) for p in range(4)]
        records.append({"noise_id": 0, "noise_scale": 8.0, "prompt_index": 9,
                        "mean_logprob": None, "total_logprob": None})
        (folder / "eval_logprobs.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))
    (out / "20260102-000000" / "viz.html").write_text("<html><script>1</script></html>")
    (out / "not_a_run").mkdir()
    return out


@pytest.fixture
def world(tmp_path) -> dict:
    demo = build(tmp_path)
    _extraction(demo)
    rows = _steering(tmp_path, demo)
    calibration = _calibration(demo)
    _model_diff(demo)
    noising = _noising(tmp_path)
    return {"root": tmp_path, "demo": demo, "rows": rows, "calibration": calibration,
            "noising": noising}


@pytest.fixture
def client(world) -> TestClient:
    app = create_app(ServerState(), experiments_root=world["demo"].parent,
                     noising_dir=world["noising"])
    return TestClient(app, base_url=LOCAL)


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Trait data lookups (``./datasets/traits``) see the test's files only."""
    monkeypatch.chdir(tmp_path)


def get(client: TestClient, endpoint: str, **params) -> dict:
    answer = client.get(f"/api/data/{endpoint}", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def error(client: TestClient, endpoint: str, status: int, **params) -> str:
    answer = client.get(f"/api/data/{endpoint}", params=params)
    assert answer.status_code == status, answer.text
    return answer.json()["error"]


JOY_BASE = {"exp": "demo", "trait": JOY, "variant": "base"}


# --- extraction ----------------------------------------------------------------------------------

def test_extraction_grid_is_the_vectors_stats(client):
    entry = next(t for t in get(client, "extraction", exp="demo")["traits"]
                 if t["trait"] == JOY)
    (grid,) = entry["grids"]
    assert grid["methods"] == ["mean_diff", "probe"] and grid["layers"] == [1, 2, 3]
    for i, method in enumerate(grid["methods"]):
        for j, layer in enumerate(grid["layers"]):
            if (method, layer) == ("probe", 2):
                assert grid["accuracy"][i][j] is None and grid["effect_size"][i][j] is None
                continue
            assert grid["accuracy"][i][j] == _stats(method, layer)["accuracy"]
            assert grid["effect_size"][i][j] == _stats(method, layer)["effect_size"]
    cells = [(m, la) for m, la in [("mean_diff", 1), ("mean_diff", 2), ("mean_diff", 3),
                                   ("probe", 1), ("probe", 3)]]
    best = max(cells, key=lambda c: (_stats(*c)["effect_size"], -c[1]))
    assert (grid["best"]["method"], grid["best"]["layer"]) == best


@pytest.mark.parametrize("steered", [True, False])
def test_best_vector_is_select_vectors_choice(client, world, steered):
    if not steered:
        (world["demo"] / "steering" / JOY / "base" / "results.jsonl").unlink()
    exp = load_experiment("demo", world["demo"].parent)
    choice = select_vectors(exp, JOY, variant="base", layer="best")[0]
    entry = next(t for t in get(client, "extraction", exp="demo")["traits"]
                 if t["trait"] == JOY)
    (row,) = entry["best"]
    assert (row["method"], row["layer"]) == (choice.vector.method, choice.vector.layer)
    assert choice.reason.endswith(row["reason"])
    assert row["chosen_by"] == ("steering" if "steering" in choice.reason else "effect_size")
    stats = _stats(row["method"], row["layer"])
    assert {k: row[k] for k in stats} == stats


def test_vector_lens_and_contrastive_are_verbatim(client):
    lens = get(client, "vector_lens", **JOY_BASE)
    assert lens["vectors"][0]["toward"][0]["token"] == EVIL_TEXT
    page = get(client, "contrastive", **JOY_BASE, offset="1", limit="5")
    assert page["total"] == 3 and page["test_pairs"] == [1]
    assert [i["index"] for i in page["items"]] == [1, 2]
    assert page["items"][0]["held_out"] and not page["items"][1]["held_out"]
    assert page["items"][0]["positive"] == {"text": f"pos 1 {EVIL_TEXT}", "completion": " yes 1"}
    assert page["items"][0]["negative"]["completion"] == " no <b>1</b>"
    assert page["items"][1]["negative"] is None
    assert "residlab extract-viz" in error(client, "vector_lens", 404, exp="demo",
                                           trait="emotion/optimism", variant="base")


# --- steering ------------------------------------------------------------------------------------

def _oracle(rows: list[dict], threshold: int, method: str) -> dict[int, tuple]:
    """Per layer: (best trait, coefficient) among positive-coefficient means with coherence
    >= threshold; trait means over the questions, plain Python."""
    groups = defaultdict(list)
    for row in rows:
        if row["method"] == method and row["layer"] is not None and row["coefficient"] > 0:
            groups[row["layer"], row["coefficient"]].append(row)
    best = {}
    for (layer, coefficient), group in groups.items():
        trait = sum(r["trait_score"] for r in group) / len(group)
        coherence = sum(r["coherence_score"] for r in group) / len(group)
        if coherence >= threshold and (layer not in best or trait > best[layer][0]):
            best[layer] = (trait, coefficient)
    return best


@pytest.mark.parametrize("threshold", [0, 55, 65, 70, 77, 100])
def test_best_trait_per_layer_at_a_threshold(client, world, threshold):
    answer = get(client, "steering", **JOY_BASE, min_coherence=str(threshold))
    assert answer["min_coherence"] == threshold
    for method in ("mean_diff", "probe"):
        (line,) = [x for x in answer["lines"] if x["method"] == method and x["direction"] == "+"]
        got = {p["layer"]: (p["trait"], p["coefficient"]) for p in line["points"]}
        want = _oracle(world["rows"], threshold, method)
        assert got.keys() == want.keys()
        for layer in want:
            assert got[layer][0] == pytest.approx(want[layer][0])
            assert got[layer][1] == want[layer][1]
        base = [r["trait_score"] for r in world["rows"]
                if r["method"] == method and r["layer"] is None]
        assert line["baseline"]["trait"] == pytest.approx(sum(base) / len(base))


def test_steering_grids_runs_ratio_and_definition(client, world):
    answer = get(client, "steering", **JOY_BASE, min_coherence="77")
    assert answer["definition"] == DEFINITION
    assert answer["facets"]["direction"] == ["+", "-"]
    grid = next(g for g in answer["grids"] if g["method"] == "probe")
    assert grid["layers"] == [1, 2, 3] and grid["coefficients"] == [-8.0, -4.0, 4.0, 8.0]
    rows = [r for r in world["rows"] if r["method"] == "probe"]
    base = np.mean([r["trait_score"] for r in rows if r["layer"] is None])
    cell = [r for r in rows if r["layer"] == 1 and r["coefficient"] == -8.0]
    assert grid["delta"][0][0] == pytest.approx(np.mean([r["trait_score"] for r in cell]) - base)
    assert grid["coherence"][0][0] == pytest.approx(np.mean([r["coherence_score"] for r in cell]))
    assert grid["delta"][1][0] is None  # no run at layer 2, coefficient -8
    norms = {int(k): v["mean_norm"] for k, v in world["calibration"]["layers"].items()}
    for run in answer["runs"]:
        assert run["ratio"] == pytest.approx(abs(run["coefficient"]) / norms[run["layer"]])
        assert run["passes"] == (run["coherence"] >= 77)
    minus = next(x for x in answer["lines"] if x["method"] == "probe" and x["direction"] == "-")
    passing = [r for r in answer["runs"] if r["key"] == minus["key"] and r["passes"]]
    for point in minus["points"]:
        assert point["trait"] == min(r["trait"] for r in passing if r["layer"] == point["layer"])


def test_steering_slider_changes_which_runs_count(client):
    low = get(client, "steering", **JOY_BASE, min_coherence="0")
    high = get(client, "steering", **JOY_BASE, min_coherence="100")
    assert all(r["passes"] for r in low["runs"]) and not any(r["passes"] for r in high["runs"])
    assert all(not line["points"] for line in high["lines"])
    assert error(client, "steering", 400, **JOY_BASE, min_coherence="101")


@pytest.mark.parametrize("sort", ["layer", "coefficient", "trait", "coherence"])
def test_response_browser_sorts_filters_and_pairs_the_baseline(client, world, sort):
    rows = [r for r in world["rows"] if r["layer"] is not None]
    field = {"trait": "trait_score", "coherence": "coherence_score"}.get(sort)
    got = get(client, "steering_responses", **JOY_BASE, layer="all", direction="all",
              sort=sort, offset="0", limit="500")
    assert got["total"] == len(rows) and got["definition"] == DEFINITION
    values = [i[field or sort] for i in got["items"]]
    assert values == sorted(values, reverse=field is not None)
    for item in got["items"]:
        base = next(r for r in world["rows"] if r["layer"] is None
                    and r["method"] == item["method"] and r["question"] == item["question"])
        assert item["baseline_answer"] == base["answer"]
        assert item["answer"].endswith(f"{item['question']} <i>")
    filtered = get(client, "steering_responses", **JOY_BASE, layer="1", direction="-",
                   sort=sort, offset="0", limit="500")
    want = [r for r in rows if r["layer"] == 1 and r["coefficient"] < 0]
    assert filtered["total"] == len(want)
    assert {i["answer"] for i in filtered["items"]} == {r["answer"] for r in want}
    page = get(client, "steering_responses", **JOY_BASE, layer="all", direction="all",
               sort=sort, offset="40", limit="50")
    assert [i["index"] for i in page["items"]] == list(range(40, len(rows)))


# --- analysis ------------------------------------------------------------------------------------

def test_calibration_norms_massive_dims_and_cosine(client, world):
    got = get(client, "calibration", exp="demo", variant="base")
    layers = world["calibration"]["layers"]
    assert got["norms"]["residual"] == [layers[str(i)]["mean_norm"] for i in range(4)]
    assert got["norms"]["attn"] is None and got["norms_hint"]
    means = np.array([layers[str(i)]["mean"] for i in range(4)])
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    matrix = _b64(got["cosine"]["matrix_b64"]).reshape(4, 4)
    np.testing.assert_allclose(matrix, unit @ unit.T, rtol=1e-5, atol=1e-6)
    assert got["cosine"]["adjacent"] == pytest.approx([float(unit[i] @ unit[i + 1])
                                                       for i in range(3)])
    massive = got["massive"]
    assert massive["criterion_dims"] == [3, 5]  # top 5 at >= 3 layers; 7 at 3? no: see below
    by_dim = {d["dim"]: d for d in massive["dims"]}
    assert by_dim[7]["top5_layers"] == [0, 1] and not by_dim[7]["criterion"]
    assert by_dim[3]["value_by_layer"] == [layers[str(i)]["mean"][3] for i in range(4)]


def test_model_diff_and_logprob_diff(client, world):
    diff = get(client, "model_diff", exp="demo", a="base", b="tuned", set="hostile")
    (trait,) = diff["traits"]
    assert trait["selection"] == f"sel {EVIL_TEXT}"
    assert (trait["peak_layer"], trait["spread_a"], trait["spread_b"]) == (2, 0.4, 0.6)
    assert trait["cosine"] == [0.1, -0.2] and trait["effect_size"] == [0.5, 1.5]
    folder = world["demo"] / "model_diff/base_vs_tuned/logprobs/hostile"
    docs = [json.loads((folder / f"{i}.json").read_text()) for i in ("1", "2", "10")]
    got = get(client, "logprob_diff", exp="demo", a="base", b="tuned", set="hostile")
    width = max(len(d["delta"]) for d in docs)
    for i in range(width):
        at = [d["delta"][i] for d in docs if len(d["delta"]) > i]
        assert got["mean_delta"][i] == pytest.approx(np.mean(at)) and got["n_at"][i] == len(at)
    assert got["overall"]["mean_kl"] == pytest.approx(np.mean(sum((d["kl"] for d in docs), [])))
    assert [p["prompt_id"] for p in got["prompts"]] == ["1", "2", "10"]
    assert "diff logprobs" in error(client, "logprob_diff", 404, exp="demo", a="tuned",
                                    b="base", set="hostile")


def test_diff_spans_rank_the_files_clauses_with_absolute_tokens(client, world):
    folder = world["demo"] / "model_diff/base_vs_tuned/per_token_diff" / JOY / "L2/hostile"
    clauses = [{**c, "prompt_id": i} for i in ("1", "2", "10")
               for c in json.loads((folder / f"{i}.json").read_text())["clauses"]]
    got = get(client, "diff_spans", exp="demo", a="base", b="tuned", set="hostile",
              source="per_token", trait=JOY, layer="2", sort="abs", top="4")
    want = sorted(clauses, key=lambda c: -abs(c["mean_delta"]))[:4]
    assert [(s["prompt_id"], s["mean_delta"]) for s in got["spans"]] == [
        (c["prompt_id"], c["mean_delta"]) for c in want]
    for span in got["spans"]:
        end = len(_response(span["prompt_id"])["tokens"]) - len(
            json.loads((folder / f"{span['prompt_id']}.json").read_text())["tokens"])
        assert span["variant"] == "tuned"
        assert (span["start"], span["end"]) == (end + span["response_start"],
                                                end + span["response_end"])
    low = get(client, "diff_spans", exp="demo", a="base", b="tuned", set="hostile",
              source="logprobs", sort="neg", top="20")
    assert [s["mean_delta"] for s in low["spans"]] == sorted(s["mean_delta"]
                                                             for s in low["spans"])



def test_diff_files_of_the_wrong_shape_name_the_file_and_the_command(client, world):
    pair = world["demo"] / "model_diff/base_vs_tuned"
    logprobs = pair / "logprobs/hostile/2.json"
    doc = json.loads(logprobs.read_text())
    logprobs.write_text(json.dumps({**doc, "kl": doc["kl"][:-1]}))  # one short
    message = error(client, "logprob_diff", 400, exp="demo", a="base", b="tuned", set="hostile")
    assert str(logprobs) in message and "lists of one length" in message
    assert "residlab diff logprobs" in message
    per_token = pair / "per_token_diff" / JOY / "L2/hostile/10.json"
    per_token.write_text(json.dumps({"prompt_id": "10", "per_token_delta": [0.1]}))
    message = error(client, "diff_spans", 400, exp="demo", a="base", b="tuned", set="hostile",
                    source="per_token", trait=JOY, layer="2")
    assert str(per_token) in message and "'per_token_delta' and 'clauses'" in message
    assert "residlab diff per-token" in message

# --- noising -------------------------------------------------------------------------------------

def _printed(records: list[dict]) -> tuple[list[tuple], list[tuple]]:
    """``noise eval``'s printed summary: (scale, n, mean, median, p5) rows and the drops."""
    text = summarize(records)
    rows = [tuple(float(x) for x in line.split()) for line in text.splitlines()[1:]
            if re.fullmatch(r"\s*[\d.]+\s+\d+(\s+-?[\d.]+){3}", line)]
    drops = [(int(m.group(1)), float(m.group(2)))
             for m in re.finditer(r"noise (\d+): ([+-][\d.]+)", text)]
    return rows, drops


def test_noising_run_matches_noise_eval_summary(client, world):
    listing = get(client, "noising_runs")
    assert [r["run"] for r in listing["runs"]] == ["20260102-000000", "20260101-000000"]
    assert listing["runs"][0]["shaping_reason"] == EVIL_TEXT and listing["runs"][0]["viz"]
    run = "20260101-000000"
    records = [json.loads(line) for line in
               (world["noising"] / run / "eval_logprobs.jsonl").read_text().splitlines()]
    got = get(client, "noising_run", run=run, metric="mean_logprob")
    rows, drops = _printed(records)
    assert [(q["scale"], q["n"], round(q["mean"], 3), round(q["q"][2], 3), round(q["q"][0], 3))
            for q in got["quantiles"]] == [tuple(r[:2]) + tuple(r[2:]) for r in rows]
    assert [(d["noise_id"], round(d["drop"], 3)) for d in got["drops"]] == drops
    assert got["n_empty"] == 1 and got["viz"] is False and got["viz_url"] is None


def test_noising_viz_is_served_sandboxed_by_listing_only(client, world):
    out = world["noising"]
    answer = client.get("/noising/20260102-000000/viz.html")
    assert answer.status_code == 200 and answer.text.startswith("<html>")
    assert "sandbox" in answer.headers["content-security-policy"]
    os.symlink(out / "20260102-000000", out / "linked")
    os.symlink(out / "20260102-000000" / "viz.html", out / "20260101-000000" / "viz.html")
    for path in ("/noising/linked/viz.html", "/noising/20260101-000000/viz.html",
                 "/noising/..%2Foutputs%2F20260102-000000/viz.html", "/noising/%2e%2e/viz.html",
                 "/noising/not_a_run/viz.html"):
        assert client.get(path).status_code == 404, path
    for run in ("linked", "..", "../outputs/20260101-000000", "not_a_run", ".hidden"):
        error(client, "noising_run", 404, run=run, metric="mean_logprob")
    assert get(client, "noising_run", run="20260102-000000",
               metric="mean_logprob")["viz_url"] == "/noising/20260102-000000/viz.html"


def test_no_noising_dir_says_what_to_run(world):
    data = DashboardData(world["demo"].parent, ["demo"], noising_dir=world["root"] / "absent")
    answer = data.answer("noising_runs", {})
    assert not answer["available"] and "residlab noise generate" in answer["hint"]


# --- overview and export keys --------------------------------------------------------------------

def test_overview_lists_what_exists(client):
    got = get(client, "overview", exp="demo")
    assert {(e["trait"], e["variant"]) for e in got["extraction"]} >= {(JOY, "base")}
    assert got["steering"] == [{"trait": JOY, "category": "emotion", "name": "joy",
                                "variant": "base", "n_rows": 48}]
    (pair,) = got["diffs"]
    assert pair["per_token"] == [{"trait": JOY, "layer": 2, "set": "hostile"}]
    assert pair["compare"] == ["hostile"] and pair["logprobs"] == ["hostile"]
    assert got["noising"] == {"available": True, "runs": 2}


def test_export_keys_cover_every_slider_value_and_page(world):
    data = DashboardData(world["demo"].parent, ["demo"], noising_dir=world["noising"])
    keys = list(data.export_keys("demo"))
    steering = [p for e, p in keys if e == "steering"]
    assert sorted(int(p["min_coherence"]) for p in steering) == list(range(101))
    pages = [p for e, p in keys if e == "steering_responses"]
    assert len(pages) == 4 and {p["sort"] for p in pages} == {"layer", "coefficient", "trait",
                                                              "coherence"}
    assert all(p["layer"] == "all" and p["direction"] == "all" for p in pages)
    spans = [p for e, p in keys if e == "diff_spans"]
    assert len(spans) == 6 and ("noising_run", {"run": "20260101-000000",
                                                "metric": "total_logprob"}) in keys
    for endpoint, params in keys:
        if endpoint in ("steering", "steering_responses", "diff_spans", "noising_run",
                        "calibration", "model_diff", "logprob_diff", "overview"):
            data.answer(endpoint, params)  # every key of these answers
