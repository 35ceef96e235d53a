"""The dashboard API on the fixture experiment made with the embedded model (slow).

The lens and attention answers equal the ``extract-viz`` files; computed on demand (a server
holding the ``tuned`` variant's model; ``p2`` has no file) they equal ``logit_lens`` run
directly and the eager forward's ``output_attentions``. Every request of ``export_keys``
answers 200, part 2's endpoints included; part 2's steering, calibration and noising answers
equal plain recomputations from the fixture's files.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.numpy import load_file

from residlab.experiments import load_experiment, load_variant
from residlab.inference import logit_lens
from residlab.inference.attention import eager_attention
from residlab.noising.stats import scale_quantiles, vector_drops
from residlab.server.app import create_app
from residlab.server.dashboard import deepdive
from residlab.server.dashboard.data import ENDPOINTS, DashboardData
from residlab.server.state import ServerState

pytestmark = pytest.mark.slow

LOCAL = "http://127.0.0.1"
TUNED = {"exp": "demo", "variant": "tuned", "set": "hostile"}


def _b64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


@pytest.fixture(scope="module")
def served(dashboard_root):
    """A client of a server holding the tuned variant's model, and that model."""
    exp = load_experiment("demo", dashboard_root / "experiments")
    loaded = load_variant(exp, "tuned")
    state = ServerState(loaded=loaded, experiment=exp, variant="tuned")
    return TestClient(create_app(state), base_url=LOCAL), loaded, exp


def _get(client: TestClient, endpoint: str, **params) -> dict:
    answer = client.get(f"/api/data/{endpoint}", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _viz(exp, name: str):
    return exp.path / "analysis" / "per_token" / "tuned" / "hostile" / name


def test_lens_and_attention_from_the_files(served):
    client, _, exp = served
    doc = json.loads(_viz(exp, "p1_logit_lens.json").read_text())
    weights = load_file(str(_viz(exp, "p1_attention.safetensors")))["attention"]
    weights = weights.astype(np.float32)  # (2, H, T, T)
    for token in (0, 7, len(doc["tokens"]) - 2):
        lens = _get(client, "lens", id="p1", token=str(token), **TUNED)
        assert lens["source"] == "file" and lens["layers"] == ["embed", 12, 18]
        assert lens["by_layer"] == doc["predictions"][token]["by_layer"]
        attention = _get(client, "attention", id="p1", token=str(token), layer="18", **TUNED)
        assert attention["source"] == "file" and attention["layers"] == [12, 18]
        context = token + 1
        np.testing.assert_allclose(_b64(attention["mean_b64"]).reshape(2, context),
                                   weights[:, :, token, :context].mean(1), rtol=1e-6)
        np.testing.assert_allclose(_b64(attention["heads_b64"]).reshape(-1, context),
                                   weights[1, :, token, :context])


def _record(exp, prompt_id: str) -> dict:
    path = exp.path / "inference" / "tuned" / "responses" / "hostile" / f"{prompt_id}.json"
    return json.loads(path.read_text())


def test_lens_computed_on_demand_equals_logit_lens(served):
    client, loaded, exp = served
    assert not _viz(exp, "p2_logit_lens.json").exists()
    ids = _record(exp, "p2")["token_ids"]
    readout = logit_lens(loaded, ids, top_k=5)
    for token in (0, len(ids) // 2, len(ids) - 2):
        answer = _get(client, "lens", id="p2", token=str(token), **TUNED)
        assert answer["source"] == "computed"
        assert answer["layers"] == ["embed", *range(30)] == readout.layers
        for row, entry in enumerate(answer["by_layer"]):
            assert [t["token_id"] for t in entry["top_k"]] == readout.top_ids[row, token].tolist()
            np.testing.assert_allclose([t["prob"] for t in entry["top_k"]],
                                       readout.top_probs[row, token].numpy(), rtol=1e-5)
            assert entry["actual_rank"] == int(readout.actual_rank[row, token])
    assert answer["token"] == loaded.tokenizer.decode([ids[token]])


def test_attention_computed_on_demand_equals_output_attentions(served):
    client, loaded, exp = served
    ids = _record(exp, "p2")["token_ids"]
    with eager_attention(loaded.model), torch.inference_mode():
        out = loaded.model(input_ids=torch.tensor([ids]), output_attentions=True)
    weights = torch.stack(out.attentions)[:, 0].float().numpy()  # (30, H, T, T)
    token = len(ids) - 3
    answer = _get(client, "attention", id="p2", token=str(token), layer="7", **TUNED)
    assert answer["source"] == "computed" and answer["layers"] == list(range(30))
    context = token + 1
    np.testing.assert_allclose(_b64(answer["mean_b64"]).reshape(30, context),
                               weights[:, :, token, :context].mean(1), atol=2e-3)
    np.testing.assert_allclose(_b64(answer["heads_b64"]).reshape(-1, context),
                               weights[7, :, token, :context], atol=2e-3)


def test_on_demand_refusals(served, monkeypatch):
    client, _, _ = served
    other = client.get("/api/data/lens", params={**TUNED, "variant": "base", "id": "p2",
                                                 "token": "1"})
    assert other.status_code == 404 and "residlab extract-viz" in other.json()["error"]
    monkeypatch.setattr(deepdive, "ATTENTION_LIMIT", 1 << 16)
    big = client.get("/api/data/attention", params={**TUNED, "id": "p3", "token": "1"})
    assert big.status_code == 400 and "--layers" in big.json()["error"]


def _part2(dashboard_root) -> TestClient:
    return TestClient(create_app(ServerState(), experiments_root=dashboard_root / "experiments",
                                 noising_dir=dashboard_root / "noising" / "outputs"),
                      base_url=LOCAL)


def test_export_keys_all_answer(dashboard_root):
    root = dashboard_root / "experiments"
    client = _part2(dashboard_root)
    data = DashboardData(root, ["demo"], noising_dir=dashboard_root / "noising" / "outputs")
    keys = list(data.export_keys("demo"))
    assert {endpoint for endpoint, _ in keys} == set(ENDPOINTS)
    for endpoint, params in keys:
        answer = client.get(f"/api/data/{endpoint}", params=params)
        assert answer.status_code == 200, (endpoint, params, answer.text)


OPTIMISM = {"exp": "demo", "trait": "emotion/optimism", "variant": "base"}


@pytest.mark.parametrize("threshold", [0, 31, 77])
def test_steering_best_per_layer_equals_the_results(dashboard_root, threshold):
    client = _part2(dashboard_root)
    path = dashboard_root / "experiments/demo/steering/emotion/optimism/base/results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["layer"] is not None and row["coefficient"] > 0:
            groups.setdefault((row["layer"], row["coefficient"]), []).append(row)
    want: dict[int, float] = {}
    for (layer, _), group in groups.items():
        trait = sum(r["trait_score"] for r in group) / len(group)
        if sum(r["coherence_score"] for r in group) / len(group) >= threshold:
            want[layer] = max(want.get(layer, -1.0), trait)
    answer = _get(client, "steering", **OPTIMISM, min_coherence=str(threshold))
    (line,) = answer["lines"]
    assert {p["layer"]: pytest.approx(p["trait"]) for p in line["points"]} == want
    assert "<script>" in answer["definition"]  # verbatim, the page sets it as text
    questions = {r["question"] for r in rows}
    page = _get(client, "steering_responses", **OPTIMISM, layer="all", direction="all",
                sort="trait", offset="0", limit="50")
    assert {i["question"] for i in page["items"]} <= questions
    assert any("<img" in i["question"] for i in page["items"])


def test_calibration_and_noising_equal_the_files(dashboard_root):
    client = _part2(dashboard_root)
    doc = json.loads((dashboard_root / "experiments/demo/inference/base/massive_activations/"
                      "calibration.json").read_text())
    got = _get(client, "calibration", exp="demo", variant="base")
    means = np.array([doc["layers"][str(i)]["mean"] for i in got["layers"]])
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    n = len(got["layers"])
    np.testing.assert_allclose(_b64(got["cosine"]["matrix_b64"]).reshape(n, n), unit @ unit.T,
                               atol=1e-5)
    (run,) = _get(client, "noising_runs")["runs"]
    folder = dashboard_root / "noising" / "outputs" / run["run"]
    records = [json.loads(line) for line in
               (folder / "eval_logprobs.jsonl").read_text().splitlines()]
    answer = _get(client, "noising_run", run=run["run"], metric="mean_logprob")
    assert answer["quantiles"] == scale_quantiles(records)
    assert [d["drop"] for d in answer["drops"]] == [d["drop"] for d in vector_drops(records)]
    assert answer["viz"] and client.get(answer["viz_url"]).status_code == 200
