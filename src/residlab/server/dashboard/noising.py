"""The Noising view's answers: the runs under the noising runner's ``output_dir`` (the server's
``--noising-dir``) with their config summary, and one run's per-scale log-prob quantiles and
vector drop table — :mod:`residlab.noising.stats` on ``eval_logprobs.jsonl``, the numbers
``residlab noise eval`` prints. A run is found in a listing of that folder only (hidden
entries and symlinks left out), never from a path in the request.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from residlab.errors import NotFound, UsageError
from residlab.noising.stats import METRICS, scale_quantiles, vector_drops
from residlab.server.dashboard.files import DashboardFiles, Invalid, Params

__all__ = ["HANDLERS", "export_keys", "viz_files", "viz_path", "viz_url"]

CONFIG_FIELDS = ("model_name", "layer_index", "site", "positions", "noise_norms",
                 "num_noise_vectors", "num_prompts", "max_new_tokens", "seed", "do_sample",
                 "shape_noise")
HINT = "residlab noise generate --config noise.yaml"


def _parse_yaml(path: Path, data: bytes) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as error:
        raise Invalid(f"not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(doc, dict):
        raise Invalid("not a mapping")
    return doc


def _parse_records(path: Path, data: bytes) -> list[dict]:
    import orjson

    rows = [orjson.loads(line) for line in data.splitlines() if line.strip()]
    if not all(isinstance(r, dict) and "noise_id" in r and "noise_scale" in r for r in rows):
        raise Invalid("a line is not a record with noise_id and noise_scale")
    return rows


def _top(data: DashboardFiles) -> Path | None:
    folder = data.noising_dir
    return None if folder is None or not folder.is_dir() else folder.resolve()


def _runs(data: DashboardFiles) -> list[str]:
    """Run folders (those with a config.yaml), newest (largest name) first."""
    if _top(data) is None:
        return []
    folder = data.noising_dir
    return sorted((name for name in data.dirs(folder)
                   if data.child(folder, name, "config.yaml", is_dir=False) is not None),
                  reverse=True)


def _run_file(data: DashboardFiles, run: str, name: str) -> Path | None:
    if run not in _runs(data):
        return None
    return data.child(data.noising_dir, run, name, is_dir=False)


def viz_path(data: DashboardFiles, run: str) -> Path | None:
    """The run's ``viz.html`` when the listing has it (and it lies inside the noising dir)."""
    path = _run_file(data, run, "viz.html")
    if path is None or not path.resolve().is_relative_to(_top(data)):
        return None
    return path


def viz_url(run: str) -> str:
    """Where the page opens a run's ``viz.html``: this server path, or, in a static export,
    the same path relative to the export folder (``noising/{run}/viz.html``)."""
    return f"/noising/{quote(run, safe='')}/viz.html"


def viz_files(data: DashboardFiles) -> dict[str, Path]:
    """``{run: its viz.html}`` of every listed run that has one (for the static export)."""
    found = {run: viz_path(data, run) for run in _runs(data)}
    return {run: path for run, path in found.items() if path is not None}


def _summary(data: DashboardFiles, run: str) -> dict[str, Any]:
    """The config summary of one run (``error`` set when its config.yaml does not read)."""
    out: dict[str, Any] = {"run": run, "error": None}
    try:
        config = data.load(_run_file(data, run, "config.yaml"), _parse_yaml, top=_top(data))
    except Invalid as error:
        config, out["error"] = {}, f"config.yaml: {error}"
    shaping = config.get("noise_shaping") if isinstance(config.get("noise_shaping"),
                                                        dict) else {}
    out.update({("model" if k == "model_name" else k): config.get(k) for k in CONFIG_FIELDS})
    out.update({"shaped": shaping.get("shaped"), "shaping_reason": shaping.get("reason"),
                "scored": _run_file(data, run, "eval_logprobs.jsonl") is not None,
                "viz": viz_path(data, run) is not None})
    return out


def noising_runs(data: DashboardFiles, p: Params) -> dict[str, Any]:
    available = _top(data) is not None
    runs = [_summary(data, run) for run in _runs(data)]
    hint = None if runs else (f"no noising runs under {data.noising_dir}; make one with "
                              f"'{HINT}'" if available else f"no noising folder; make a run "
                              f"with '{HINT}' (and serve --noising-dir its output_dir)")
    return {"available": available, "runs": runs, "hint": hint}


def noising_run(data: DashboardFiles, p: Params) -> dict[str, Any]:
    run = p.text("run")
    metric = p.choice("metric", METRICS, "mean_logprob")
    if run not in _runs(data):
        raise NotFound(f"no noising run {run!r} under {data.noising_dir} (runs: "
                       f"{', '.join(_runs(data)) or 'none'}); make one with '{HINT}'")
    path = _run_file(data, run, "eval_logprobs.jsonl")
    command = f"residlab noise eval --run-dir {data.noising_dir / run}"
    if path is None:
        raise NotFound(f"noising run {run} is not scored yet; score it with '{command}'")
    try:
        records = data.load(path, _parse_records, top=_top(data))
    except Invalid as error:
        raise UsageError(f"{path} is not valid ({error}); score it again with "
                         f"'{command}'") from None
    unscored = [r for r in records if r.get("unscored")]
    empty = [r for r in records if not r.get("unscored") and r.get(metric) is None]
    drops = [{**d, "per_scale": [[scale, mean] for scale, mean in d["per_scale"].items()]}
             for d in vector_drops(records, metric)]
    has_viz = viz_path(data, run) is not None
    return {"run": run, "metric": metric, "config": _summary(data, run),
            "n_records": len(records), "n_unscored": len(unscored), "n_empty": len(empty),
            "quantiles": scale_quantiles(records, metric), "drops": drops, "viz": has_viz,
            "viz_url": viz_url(run) if has_viz else None}


def export_keys(data: DashboardFiles, name: str) -> Iterator[tuple[str, dict[str, str]]]:
    yield "noising_runs", {}
    for run in _runs(data):
        for metric in METRICS:
            yield "noising_run", {"run": run, "metric": metric}


HANDLERS = {"noising_runs": noising_runs, "noising_run": noising_run}
