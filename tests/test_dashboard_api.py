"""The dashboard's JSON API on a small experiment written here from plain files (no model).

Oracles: the JSON numbers of the files themselves (decoded from the base64 answers with
numpy), ``project_many`` for the massive-dims cleaning, ``top_spans`` for the Top Spans, the
safetensors tensor for attention. Path traversal in every encoding and planted symlinks must
answer 404.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from safetensors.numpy import save_file

from residlab.analysis.model_diff.spans import top_spans
from residlab.experiments import load_experiment
from residlab.inference.project import project_many
from residlab.outputs import tensor_sha256
from residlab.server.app import create_app
from residlab.server.dashboard.data import DashboardData
from residlab.server.dashboard.files import canonical_key
from residlab.server.state import ServerState
from residlab.traits.vectors import TraitVector, save_vector

D = 16
FILE_DIMS = [3, 5, 7, 9]  # the massive dims the projection files record (calibration top 4)
TOP5 = [3, 5]  # in the calibration's top 5 at >= 3 of its 4 layers; 7 at 2 layers only
EVIL = "hostile/<img src=x onerror=alert(1)>"
OPTIMISM = "emotion/optimism"
PROMPTS = {  # id -> (prompt tokens, response tokens); ids sort naturally as 1, 2, 10
    "10": (["<s>", "Hi", " there"], ["Hello", ",", " friend", ".", " Bye"]),
    "2": (["<s>", "Rain", "?"], ["It", " falls", ";", " wet", "!"]),
    "1": (["<s>", "<script>x</script>", " go"], ["Yes", ".", " No", ",", " maybe", "."]),
}
IDS = ["1", "2", "10"]
LOCAL = "http://127.0.0.1"


def _b64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY))


def _response(prompt_id: str, prompt_note: str | None = None) -> dict:
    prompt, response = PROMPTS[prompt_id]
    tokens = prompt + response
    return {"id": prompt_id, "prompt": f"prompt {prompt_id} " + "x" * 300, "response":
            "".join(response), "system_prompt": None, "tokens": tokens,
            "token_ids": list(range(10, 10 + len(tokens))), "prompt_end": len(prompt),
            "prompt_note": prompt_note, "tags": ["t" + prompt_id]}


def _hidden(variant: str, layer: int, prompt_id: str) -> torch.Tensor:
    """Seeded activations (T, D) with large values on the massive dims."""
    n = sum(len(part) for part in PROMPTS[prompt_id])
    seed = {"base": 0, "tuned": 1}[variant] * 1000 + layer * 100 + int(prompt_id)
    hidden = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    hidden[:, FILE_DIMS] *= 30
    return hidden


def _projection_file(vector: TraitVector, hidden: torch.Tensor, n_prompt: int,
                     response_only: bool, massive: bool) -> dict:
    result = project_many(hidden, vector.unit[None], [0.0], FILE_DIMS if massive else ())[0]
    parts = {"prompt": slice(0, n_prompt), "response": slice(n_prompt, None)}
    if response_only:
        parts.pop("prompt")
    sha = tensor_sha256(vector.vector)
    record = {"metadata": {"vector_source": {**vector.source(), "sha256": sha},
                           "centered": False,
                           "settings": {"vector": {**vector.source(), "sha256": sha}}},
              "projections": {p: result["projections"][s] for p, s in parts.items()},
              "norms": {p: result["norms"][s] for p, s in parts.items()},
              "cosine": {p: result["cosine"][s] for p, s in parts.items()}}
    if massive:
        record["massive_dims"] = {"layer": vector.layer, "dims": FILE_DIMS, "values": {
            p: result["massive_values"][s] for p, s in parts.items()}}
    return record


def _vectors(exp) -> dict[tuple[str, int], TraitVector]:
    out = {}
    for trait, method, layer in ((OPTIMISM, "probe", 1), (OPTIMISM, "probe", 2),
                                 (EVIL, "mean_diff", 2)):
        gen = torch.Generator().manual_seed(layer + len(trait))
        vector = TraitVector(trait, "base", "response[:5]", "residual", method, layer,
                             torch.randn(D, generator=gen), {"effect_size": 1.0})
        save_vector(exp, vector)
        out[trait, layer] = vector
    return out


def _projections(root: Path, vectors) -> None:
    """base: response-only in the plain folder (layer 2) and at layer 1; tuned: full."""
    for variant in ("base", "tuned"):
        folder = root / "inference" / variant / "projections"
        for prompt_id in IDS:
            n_prompt = len(PROMPTS[prompt_id][0])
            for layer, name in ((2, "hostile"), (1, "hostile_L1")):
                record = _projection_file(vectors[OPTIMISM, layer],
                                          _hidden(variant, layer, prompt_id), n_prompt,
                                          variant == "base" and layer == 2, True)
                _write(folder / OPTIMISM / name / f"{prompt_id}.json", record)
            if variant == "tuned":
                record = _projection_file(vectors[EVIL, 2], _hidden(variant, 2, prompt_id),
                                          n_prompt, False, False)
                _write(folder / EVIL / "hostile" / f"{prompt_id}.json", record)


def _calibration(root: Path) -> None:
    tops = [[3, 5, 7, 1, 2, 9], [5, 3, 7, 0, 4, 9], [3, 5, 0, 1, 2, 7], [5, 3, 9, 8, 6, 7]]
    layers = {str(i): {"dims": dims[:8], "values": [1.0] * len(dims), "mean_norm": 1.0}
              for i, dims in enumerate(tops)}
    for variant in ("base", "tuned"):
        _write(root / "inference" / variant / "massive_activations" / "calibration.json",
               {"layers": layers, "top_k": 8})


def _viz(root: Path) -> None:
    """A logit lens file and an attention file (layers 1 and 2, 2 heads) for tuned's "1"."""
    folder = root / "analysis" / "per_token" / "tuned" / "hostile"
    record = _response("1")
    n = len(record["tokens"])
    predictions = [{"token_idx": i, "actual_next_token": record["tokens"][i + 1],
                    "actual_next_token_id": record["token_ids"][i + 1],
                    "by_layer": [{"layer": layer, "top_k": [{"token": f"<b>{i}</b>",
                                                             "token_id": i, "prob": 0.5}],
                                  "actual_rank": i + 1, "actual_prob": 0.1 * j}
                                 for j, layer in enumerate(["embed", 1, 2])]}
                   for i in range(n - 1)]
    _write(folder / "1_logit_lens.json", {"tokens": record["tokens"], "token_ids":
                                          record["token_ids"], "layers": ["embed", 1, 2],
                                          "predictions": predictions})
    weights = np.tril(np.random.default_rng(0).random((2, 2, n, n))).astype(np.float32)
    weights /= weights.sum(-1, keepdims=True)
    save_file({"attention": weights.astype(np.float16)}, str(folder / "1_attention.safetensors"),
              metadata={"layers": "[1, 2]", "tokens": json.dumps(record["tokens"]),
                        "token_ids": json.dumps(record["token_ids"])})


def build(root: Path) -> Path:
    """``root/experiments/demo`` (and an empty experiment ``other``); returns the demo folder."""
    exp_root = root / "experiments"
    demo = exp_root / "demo"
    variants = {"base": {"model": "default"}, "tuned": {"model": "default"}}
    for name in ("demo", "other"):
        (exp_root / name).mkdir(parents=True)
        (exp_root / name / "config.yaml").write_text(yaml.safe_dump(
            {"model_variants": variants, "defaults": {"application": "tuned"}}))
    (exp_root / "not_an_experiment").mkdir()
    for prompt_id in IDS:
        note = "<img src=x onerror=alert(2)>" if prompt_id == "1" else None
        _write(demo / "inference/tuned/responses/hostile" / f"{prompt_id}.json",
               _response(prompt_id, note))
    _write(demo / "inference/tuned/responses/extra/a.json", _response("2"))
    _write(demo / "inference/base/raw/residual/hostile/_provenance.json",
           {"last_run": {"responses_from": "tuned"}})
    vectors = _vectors(load_experiment("demo", exp_root))
    _projections(demo, vectors)
    _calibration(demo)
    _viz(demo)
    return demo


@pytest.fixture
def demo(tmp_path) -> Path:
    return build(tmp_path)


@pytest.fixture
def client(demo) -> TestClient:
    return TestClient(create_app(ServerState(), experiments_root=demo.parent), base_url=LOCAL)


def get(client: TestClient, endpoint: str, **params) -> dict:
    answer = client.get(f"/api/data/{endpoint}", params=params)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-cache"
    return answer.json()


def error(client: TestClient, endpoint: str, status: int, **params) -> str:
    answer = client.get(f"/api/data/{endpoint}", params=params)
    assert answer.status_code == status, answer.text
    message = answer.json()["error"]
    assert "\n" not in message
    return message


def _file(demo: Path, variant: str, trait: str, folder: str, prompt_id: str) -> dict:
    path = demo / "inference" / variant / "projections" / trait / folder / f"{prompt_id}.json"
    return json.loads(path.read_text())


HOSTILE = {"exp": "demo", "set": "hostile"}


# --- listing endpoints ---------------------------------------------------------------------------

def test_experiments_and_experiment_index(client, demo):
    listed = get(client, "experiments")["experiments"]
    assert [e["name"] for e in listed] == ["demo", "other"]
    assert listed[0]["variants"] == ["base", "tuned"]
    assert listed[0]["defaults"] == {"application": "tuned", "extraction": None}
    info = get(client, "experiment", exp="demo")
    assert [t["trait"] for t in info["traits"]] == [OPTIMISM, EVIL]
    assert info["traits"][1] == {"trait": EVIL, "category": "hostile",
                                 "name": "<img src=x onerror=alert(1)>"}
    assert info["prompt_sets"]["base"] == [{"name": "hostile", "n_prompts": 3,
                                            "responses_from": "tuned"}]
    assert {s["name"] for s in info["prompt_sets"]["tuned"]} == {"extra", "hostile"}
    assert info["projections"]["tuned"]["hostile"] == {
        OPTIMISM: {"layers": [1, 2], "default_layer": 2},
        EVIL: {"layers": [2], "default_layer": 2}}
    assert info["viz"] == {"base": {}, "tuned": {"hostile": {"lens": ["1"],
                                                             "attention": ["1"]}}}
    assert info["calibration"] == {"base": True, "tuned": True}
    assert info["diffs"] == []
    assert info["hints"]["captures of tuned on extra"] == (
        "residlab capture --experiment demo --prompt-set extra --model-variant tuned")


def test_an_experiment_without_projections_says_what_to_run(client):
    info = get(client, "experiment", exp="other")
    assert info["hints"]["responses"].startswith("residlab responses --experiment other")
    assert "trait vectors" in info["hints"]
    message = error(client, "projections", 404, exp="demo", variant="tuned", set="extra",
                    id="a", trait=OPTIMISM)
    assert "residlab project --experiment demo --prompt-set extra --model-variant tuned" in (
        message)


def test_prompts_in_natural_order_with_pages_and_the_replayed_responses(client):
    page = get(client, "prompts", variant="tuned", **HOSTILE)
    assert [item["id"] for item in page["items"]] == IDS
    assert page["total"] == 3 and page["responses_from"] is None
    first = page["items"][0]
    assert first["prompt"] == _response("1")["prompt"][:200]
    assert first["note"] == "<img src=x onerror=alert(2)>" and first["tags"] == ["t1"]
    assert (first["n_tokens"], first["prompt_end"]) == (9, 3)
    second = get(client, "prompts", variant="tuned", offset="1", limit="1", **HOSTILE)
    assert [item["id"] for item in second["items"]] == ["2"] and second["total"] == 3
    assert get(client, "prompts", variant="tuned", offset="5", **HOSTILE)["items"] == []
    base = get(client, "prompts", variant="base", **HOSTILE)  # no responses of its own
    assert base["responses_from"] == "tuned" and [i["id"] for i in base["items"]] == IDS


def test_response_is_the_file(client, demo):
    answer = get(client, "response", variant="base", id="10", **HOSTILE)
    record = _response("10")
    assert answer["responses_from"] == "tuned"
    for key in ("prompt", "response", "tokens", "token_ids", "prompt_end", "tags"):
        assert answer[key] == record[key]
    # its place in the natural order of the prompt list (the picker turns to that page)
    assert [get(client, "response", variant="tuned", id=i, **HOSTILE)["index"]
            for i in IDS] == [0, 1, 2]
    assert answer["index"] == IDS.index("10")


# --- projections and norms -----------------------------------------------------------------------

def test_projections_are_the_files_numbers(client, demo):
    answer = get(client, "projections", variant="tuned", id="2", trait=OPTIMISM, clean="none",
                 **HOSTILE)
    assert (answer["n_tokens"], answer["prompt_end"], answer["start"]) == (8, 3, 0)
    assert answer["default_layer"] == 2 and answer["clean_available"] == ["none", "top5", "all"]
    assert [layer["layer"] for layer in answer["layers"]] == [1, 2]
    for entry, folder in zip(answer["layers"], ("hostile_L1", "hostile"), strict=True):
        record = _file(demo, "tuned", OPTIMISM, folder, "2")
        expected = record["projections"]["prompt"] + record["projections"]["response"]
        np.testing.assert_allclose(_b64(entry["projection_b64"]), expected, rtol=1e-6)
        assert entry["mean_response_norm"] == pytest.approx(
            np.mean(record["norms"]["response"]), rel=1e-6)
        assert (entry["method"], entry["position"], entry["massive_dims_removed"]) == (
            "probe", "response[:5]", [])


def test_response_only_projections_start_at_the_prompt_end(client, demo):
    answer = get(client, "projections", variant="base", id="1", trait=OPTIMISM, clean="none",
                 **HOSTILE)
    assert (answer["n_tokens"], answer["prompt_end"], answer["start"]) == (9, 3, 3)
    assert [layer["start"] for layer in answer["layers"]] == [0, 3]  # layer 1 has the prompt
    layer2 = answer["layers"][1]
    np.testing.assert_allclose(_b64(layer2["projection_b64"]), _file(
        demo, "base", OPTIMISM, "hostile", "1")["projections"]["response"], rtol=1e-6)
    assert _b64(answer["layers"][0]["projection_b64"]).size == 9  # layer 1 holds the prompt


@pytest.mark.parametrize(("clean", "dims"), [("top5", TOP5), ("all", FILE_DIMS)])
def test_cleaned_projections_equal_project_many(client, demo, clean, dims):
    """An independent computation: project_many on the activations with those dims."""
    exp = load_experiment("demo", demo.parent)
    from residlab.traits.vectors import load_vector

    answer = get(client, "projections", variant="tuned", id="10", trait=OPTIMISM, clean=clean,
                 **HOSTILE)
    norms = get(client, "norms", variant="tuned", id="10", layer="1", clean=clean, **HOSTILE)
    for entry in answer["layers"]:
        layer = entry["layer"]
        path = next((exp.path / "extraction" / OPTIMISM / "base" / "vectors").glob(
            f"*/residual/probe/layer{layer}.safetensors"))
        oracle = project_many(_hidden("tuned", layer, "10"), load_vector(path).unit[None], [0.0],
                              dims)[0]["clean"]
        assert entry["massive_dims_removed"] == dims
        np.testing.assert_allclose(_b64(entry["projection_b64"]), oracle["projections"],
                                   rtol=1e-4, atol=1e-4)
        assert entry["mean_response_norm"] == pytest.approx(
            float(oracle["norms"][3:].mean()), rel=1e-5)
        if layer == 1:
            np.testing.assert_allclose(_b64(norms["norms_b64"]), oracle["norms"], rtol=1e-4)
    assert norms["mean_response_norm"] == pytest.approx(
        float(np.mean(_b64(norms["norms_b64"])[3:])), rel=1e-5)


def test_norms_are_the_files_norms(client, demo):
    answer = get(client, "norms", variant="base", id="2", layer="2", clean="none", **HOSTILE)
    record = _file(demo, "base", OPTIMISM, "hostile", "2")
    assert (answer["layer"], answer["n_tokens"], answer["start"]) == (2, 8, 3)
    np.testing.assert_allclose(_b64(answer["norms_b64"]), record["norms"]["response"],
                               rtol=1e-6)
    error(client, "norms", 404, variant="base", id="2", layer="7", clean="none", **HOSTILE)


def test_a_trait_without_massive_dims_offers_no_cleaning(client):
    answer = get(client, "projections", variant="tuned", id="1", trait=EVIL, clean="none",
                 **HOSTILE)
    assert answer["trait"] == EVIL and answer["clean_available"] == ["none"]
    message = error(client, "projections", 404, variant="tuned", id="1", trait=EVIL,
                    clean="all", **HOSTILE)
    assert "residlab calibrate --experiment demo --model-variant tuned" in message


# --- spans ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "window", "layer"), [("clause", "8", None),
                                                        ("window", "4", "1"),
                                                        ("window", "16", "2")])
def test_spans_equal_top_spans(client, demo, mode, window, layer):
    exp = load_experiment("demo", demo.parent)
    params = {"a": "base", "b": "tuned", "trait": OPTIMISM, "mode": mode, "window": window,
              "scope": "set", "top": "5", **HOSTILE}
    answer = get(client, "spans", **params, **({"layer": layer} if layer else {}))
    oracle = top_spans(exp, "base", "tuned", "hostile", trait=OPTIMISM,
                       layer=int(layer) if layer else None, mode=mode, window=int(window),
                       top=5)
    assert answer["layer"] == (int(layer) if layer else 2)
    assert len(answer["spans"]) == len(oracle) > 0
    for span, expected in zip(answer["spans"], oracle, strict=True):
        end = len(PROMPTS[span["prompt_id"]][0])
        assert span["prompt_id"] == expected["prompt_id"]
        assert [span["start"], span["end"]] == [end + i for i in expected["token_range"]]
        assert span["text"] == expected["text"]
        assert span["mean_delta"] == pytest.approx(expected["mean_delta"], rel=1e-6)
        assert span["z"] == pytest.approx(expected["z"], rel=1e-6)


def test_spans_of_one_prompt(client):
    answer = get(client, "spans", a="tuned", b="base", trait=OPTIMISM, layer="1", mode="window",
                 window="4", scope="prompt", id="10", top="20", **HOSTILE)
    assert {s["prompt_id"] for s in answer["spans"]} == {"10"}
    tokens = sum(PROMPTS["10"], [])
    for span in answer["spans"]:
        assert span["text"] == "".join(tokens[span["start"]:span["end"]])
    error(client, "spans", 400, a="tuned", b="base", trait=OPTIMISM, mode="sideways", **HOSTILE)


# --- lens and attention --------------------------------------------------------------------------

def test_lens_from_the_file(client, demo):
    doc = json.loads((demo / "analysis/per_token/tuned/hostile/1_logit_lens.json").read_text())
    answer = get(client, "lens", variant="tuned", id="1", token="4", **HOSTILE)
    assert answer["source"] == "file" and answer["token_idx"] == 4
    assert answer["token"] == doc["tokens"][4] and answer["layers"] == ["embed", 1, 2]
    assert answer["actual_next_token"] == doc["predictions"][4]["actual_next_token"]
    assert answer["by_layer"] == doc["predictions"][4]["by_layer"]
    for bad in ("8", "-1", "x", "1.5"):
        error(client, "lens", 400, variant="tuned", id="1", token=bad, **HOSTILE)


def test_attention_from_the_file(client, demo):
    from safetensors.numpy import load_file

    weights = load_file(str(demo / "analysis/per_token/tuned/hostile/1_attention.safetensors"))
    weights = weights["attention"].astype(np.float32)  # (2, 2, T, T)
    answer = get(client, "attention", variant="tuned", id="1", token="5", layer="2", **HOSTILE)
    assert (answer["layers"], answer["n_heads"], answer["context"], answer["layer"]) == (
        [1, 2], 2, 6, 2)
    np.testing.assert_allclose(_b64(answer["mean_b64"]).reshape(2, 6),
                               weights[:, :, 5, :6].mean(1), rtol=1e-6)
    np.testing.assert_allclose(_b64(answer["heads_b64"]).reshape(2, 6), weights[1, :, 5, :6])
    default = get(client, "attention", variant="tuned", id="1", token="0", **HOSTILE)
    assert default["layer"] == 1 and _b64(default["heads_b64"]).tolist() == [1.0, 1.0]
    error(client, "attention", 400, variant="tuned", id="1", token="9", **HOSTILE)
    error(client, "attention", 400, variant="tuned", id="1", token="1", layer="one", **HOSTILE)
    error(client, "attention", 404, variant="tuned", id="1", token="1", layer="5", **HOSTILE)


def test_lens_and_attention_of_other_tokens_are_not_shown(client, demo):
    """Responses made again since extract-viz ran: the files describe other tokens."""
    path = demo / "inference/tuned/responses/hostile/1.json"
    record = json.loads(path.read_text())
    record["token_ids"] = [t + 1 for t in record["token_ids"]]
    _write(path, record)
    for endpoint in ("lens", "attention"):
        message = error(client, endpoint, 404, variant="tuned", id="1", token="1", **HOSTILE)
        assert "made from other tokens" in message and "residlab extract-viz" in message


def test_lens_without_file_or_model(client, demo):
    """No file: 409 on a server without a model, 404 with the command without a server."""
    message = error(client, "lens", 409, variant="tuned", id="2", token="1", **HOSTILE)
    assert "no model loaded" in message
    data = DashboardData(demo.parent)
    with pytest.raises(LookupError, match="'residlab extract-viz --experiment demo "
                                          "--prompt-set hostile --model-variant tuned "
                                          "--attention'"):
        data.answer("attention", {"variant": "tuned", "id": "2", "token": "1", **HOSTILE})


# --- bad input and path safety -------------------------------------------------------------------

def test_bad_parameters_are_400(client):
    base = {"variant": "tuned", "id": "1", **HOSTILE}
    assert "clean" in error(client, "projections", 400, trait=OPTIMISM, clean="most", **base)
    error(client, "norms", 400, layer="twelve", **base)
    error(client, "prompts", 400, variant="tuned", limit="0", **HOSTILE)
    error(client, "prompts", 400, variant="tuned", offset="-3", **HOSTILE)
    assert "missing" in error(client, "response", 400, variant="tuned", **HOSTILE)


def test_unknown_endpoint_and_names_are_404(client):
    error(client, "secrets", 404, exp="demo")
    error(client, "experiment", 404, exp="nope")
    error(client, "experiment", 404, exp="not_an_experiment")
    error(client, "response", 404, exp="demo", variant="other", set="hostile", id="1")
    error(client, "response", 404, exp="demo", variant="tuned", set="nope", id="1")
    error(client, "response", 404, exp="demo", variant="tuned", set="hostile", id="3")


@pytest.mark.parametrize("name", ["..", "%2e%2e", "../demo", "demo/..", "/etc", "/etc/passwd",
                                  "demo/../demo", "..%2Fdemo", ".", "", "config.yaml"])
def test_traversal_in_any_parameter_is_404_or_400(client, demo, name):
    cases = [("experiment", {"exp": name}),
             ("prompts", {"exp": "demo", "variant": "tuned", "set": name}),
             ("response", {"exp": "demo", "variant": "tuned", "set": "hostile", "id": name}),
             ("projections", {"exp": "demo", "variant": "tuned", "set": "hostile", "id": "1",
                              "trait": name}),
             ("lens", {"exp": "demo", "variant": name, "set": "hostile", "id": "1",
                       "token": "0"})]
    for endpoint, params in cases:
        answer = client.get(f"/api/data/{endpoint}", params=params)
        assert answer.status_code in (404, 400 if name == "" else 404), (endpoint, params)


@pytest.mark.parametrize("path", ["/api/data/..%2F..%2Fetc%2Fpasswd", "/api/data/%2e%2e",
                                  "/api/data/experiments%2F..", "/api/data//etc/passwd",
                                  "/api/data/../../etc/passwd",
                                  "/api/data/experiment?exp=%2e%2e",
                                  "/api/data/experiment?exp=%2E%2E%2Fdemo",
                                  "/api/data/response?exp=demo&variant=tuned&set=%2e%2e%2fhostile"
                                  "&id=1",
                                  "/api/data/response?exp=demo&variant=tuned&set=hostile&id="
                                  "..%2F..%2Fconfig.yaml%00",
                                  "/api/data/response?exp=demo&variant=tuned&set=hostile&id="
                                  "%2Fetc%2Fpasswd"])
def test_traversal_in_the_path_or_query_is_404(client, path):
    assert client.get(path).status_code == 404


@pytest.mark.parametrize("trait", ["../optimism", "emotion/..", "emotion/../emotion/optimism",
                                   "emotion", "emotion/optimism/extra", "/emotion/optimism"])
def test_traversal_in_a_trait_is_404(client, trait):
    error(client, "projections", 404, variant="tuned", id="1", trait=trait, **HOSTILE)


def test_planted_symlinks_are_not_served(client, demo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.yaml").write_text((demo / "config.yaml").read_text())
    secret = outside / "secret.json"
    secret.write_text(json.dumps(_response("1") | {"response": "TOP-SECRET"}))
    responses = demo / "inference/tuned/responses"
    os.symlink(outside, demo.parent / "linked")  # an experiment
    os.symlink(responses / "hostile", responses / "linkset")  # a prompt set
    os.symlink(secret, responses / "hostile" / "99.json")  # a file
    os.symlink(demo / "extraction" / "emotion", demo / "inference/tuned/projections/linked")
    assert "linked" not in [e["name"] for e in get(client, "experiments")["experiments"]]
    error(client, "experiment", 404, exp="linked")
    error(client, "prompts", 404, exp="demo", variant="tuned", set="linkset")
    error(client, "response", 404, id="99", variant="tuned", **HOSTILE)
    assert "99" not in [i["id"] for i in get(client, "prompts", variant="tuned",
                                             **HOSTILE)["items"]]
    error(client, "projections", 404, variant="tuned", id="1", trait="linked/optimism",
          **HOSTILE)
    assert "TOP-SECRET" not in client.get("/api/data/response", params={
        "variant": "tuned", "id": "99", **HOSTILE}).text


def test_a_corrupt_projection_file_names_the_file(client, demo):
    path = demo / "inference/tuned/projections" / OPTIMISM / "hostile_L1" / "2.json"
    path.write_text('{"metadata": {"vector_source": {"layer": 1}}, "projections": 3}')
    message = error(client, "projections", 400, variant="tuned", id="2", trait=OPTIMISM,
                    clean="none", **HOSTILE)
    assert str(path) in message and "is not a valid projection file" in message
    assert "residlab project --experiment demo" in message
    path.write_text("{not json")
    assert str(path) in error(client, "norms", 400, variant="tuned", id="2", layer="1",
                              clean="none", **HOSTILE)


def test_a_served_experiment_is_the_only_one_listed(demo):
    state = ServerState(experiment=load_experiment("demo", demo.parent))
    client = TestClient(create_app(state), base_url=LOCAL)
    assert [e["name"] for e in get(client, "experiments")["experiments"]] == ["demo"]
    error(client, "experiment", 404, exp="other")


def test_dashboard_page_is_served_at_root(demo, tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>dash</title>")
    client = TestClient(create_app(ServerState(), static_dir=static,
                                   experiments_root=demo.parent), base_url=LOCAL)
    answer = client.get("/", follow_redirects=False)
    assert answer.status_code == 200 and "dash" in answer.text
    assert "script-src" not in answer.headers["content-security-policy"]  # default-src 'self'


def test_no_model_serves_the_experiment_without_loading(demo, monkeypatch):
    from residlab.commands.serve import ServeOptions, build_state

    monkeypatch.setattr("residlab.models.load_model", lambda *a, **k: pytest.fail("loaded"))
    state = build_state(ServeOptions(experiment="demo", no_model=True,
                                     experiments_dir=str(demo.parent)), None)
    assert state.loaded is None and state.experiment.name == "demo"


# --- export --------------------------------------------------------------------------------------

def test_export_keys_all_answer(client, demo):
    data = DashboardData(demo.parent, ["demo"])
    keys = list(data.export_keys("demo"))
    assert len({canonical_key(e, p) for e, p in keys}) == len(keys)
    by_endpoint: dict[str, list[dict]] = {}
    for endpoint, params in keys:
        assert all(isinstance(v, str) for v in params.values())
        by_endpoint.setdefault(endpoint, []).append(params)
        answer = client.get(f"/api/data/{endpoint}", params=params)
        assert answer.status_code == 200, (endpoint, params, answer.text)
    assert len(by_endpoint["lens"]) == 8  # every token of the lens file but the last
    assert len(by_endpoint["attention"]) == 9 * 3  # per token: default layer, 1, 2
    assert {p["clean"] for p in by_endpoint["projections"]} == {"none", "top5", "all"}
    spans = by_endpoint["spans"]
    assert {(p["a"], p["b"]) for p in spans} == {("base", "tuned"), ("tuned", "base")}
    assert {(p["mode"], p["window"]) for p in spans} == {
        ("clause", "8"), ("window", "4"), ("window", "8"), ("window", "16")}
    assert {p.get("id") for p in spans if p["scope"] == "prompt"} == set(IDS)


def test_canonical_key_matches_the_page():
    assert canonical_key("lens", {"token": "3", "exp": "d\u00e9mo"}) == \
        '["lens",[["exp","d\u00e9mo"],["token","3"]]]'
