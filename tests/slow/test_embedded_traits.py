"""A starter trait end to end on the embedded model: extract -> steer -> calibrate -> project."""

from __future__ import annotations

import json

import numpy as np
import pytest

from residlab.experiments import load_experiment
from residlab.inference import capture_prompt_set, generate_responses, load_raw
from residlab.inference.calibrate import run_calibration
from residlab.inference.project import project_prompt_set
from residlab.traits.extract import extract_trait
from residlab.traits.judge import LocalJudge
from residlab.traits.steer import load_results, run_steering, summarize

pytestmark = pytest.mark.slow


def test_optimism_end_to_end(tmp_path, monkeypatch, embedded):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.yaml").write_text(
        "model_variants:\n  m: {model: default, dtype: fp32, device: cpu}\n"
        "defaults: {application: m, extraction: m}\n")
    experiment = load_experiment("e")
    result = extract_trait(experiment, "emotion/optimism", layers="12-24:6",
                           methods=["mean_diff", "probe"], loaded=embedded)
    accuracy = {row["layer"]: row["accuracy"] for row in result.stats["mean_diff"]}
    assert max(accuracy.values()) >= 0.7, accuracy  # a real, separable direction

    run_steering(experiment, "emotion/optimism", layers=[18], coefficients=[0, 40],
                 judge=LocalJudge(embedded), max_new_tokens=16, loaded=embedded)
    summary = summarize(load_results(experiment, "emotion/optimism", "m"))
    assert [(r["layer"], r["coefficient"]) for r in summary] == [(None, 0.0), (18, 40.0)]
    assert all(0 <= r["trait"] <= 100 and 0 <= r["coherence"] <= 100 for r in summary)

    generate_responses(experiment, "dynamic", max_new_tokens=12, loaded=embedded, limit=3)
    capture_prompt_set(experiment, "dynamic", layers="12,18,24", dtype="fp32", loaded=embedded)
    run_calibration(experiment, max_new_tokens=8, loaded=embedded)
    written = project_prompt_set(experiment, "dynamic", centered=True)
    assert len(written) == 3
    record = json.loads(written[0].read_text())
    source = record["metadata"]["vector_source"]
    raw = load_raw(experiment.raw_dir("m", "dynamic") / f"{record['metadata']['prompt_id']}"
                   ".safetensors")
    from residlab.traits.vectors import find_vectors, load_vector

    (path,) = [f.path for f in find_vectors(
        experiment, "emotion/optimism", "m", position=None, component="residual", method=None)
        if f.method == source["method"] and f.layer == source["layer"]]
    vector = load_vector(path)
    unit = vector.vector.double().numpy()
    unit /= np.linalg.norm(unit)
    h = raw["response"]["activations"][source["layer"]]["residual"].double().numpy()
    np.testing.assert_allclose(record["projections"]["response"],
                               h @ unit - vector.stats["baseline"], atol=1e-3)
    assert len(record["massive_dims"]["dims"]) == 8
