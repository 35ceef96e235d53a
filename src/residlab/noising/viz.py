"""Write ``RUN/viz.html``: one self-contained page to find, see and compare the worst
generations of a noising run (no network needed: the chart is hand-drawn SVG).

All text reaches the page as JSON inside a ``<script type="application/json">`` block, with
``<``, ``>`` and ``&`` escaped, and is put into the document with ``textContent`` only, so a
prompt containing markup shows as text and runs nothing.

    python -m residlab.noising.viz --config configs/example.yaml --run_dir RUN --top_n 100
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from residlab.errors import UsageError
from residlab.noising.eval import EVAL_FILE
from residlab.noising.runs import RunDir
from residlab.noising.stats import METRICS, scale_quantiles, vector_drops, vector_means
from residlab.store import read_jsonl, write_text

__all__ = ["build_payload", "render_html", "run_viz"]

PAGE_SIZE = 10


def _aligned(per_scale: dict[float, float], scales: list[float]) -> list[float | None]:
    return [per_scale.get(scale) for scale in scales]


def _chart(records: list[dict], scales: list[float]) -> dict:
    out = {}
    for metric in METRICS:
        quantiles = {q["scale"]: q for q in scale_quantiles(records, metric)}
        vectors = vector_means(records, metric)
        out[metric] = {  # a scale where nothing has a score gets null
            "quantiles": [quantiles.get(scale) for scale in scales],
            "vectors": {str(i): _aligned(per, scales) for i, per in vectors.items()},
        }
    return out


def _empty(record: dict) -> bool:
    """Scored, but with no token to score (an empty response)."""
    return not record.get("unscored") and record.get("mean_logprob") is None


def _example(record: dict) -> dict:
    keys = ("noise_id", "noise_scale", "prompt_index", "messages", "tokens",
            "per_token_logprobs", "total_logprob", "mean_logprob", "n_tokens", "finish_reason")
    return {key: record.get(key) for key in keys}


def build_payload(records: list[dict], *, top_n: int, run_name: str, config: dict) -> dict:
    """Everything the page shows: chart data, the top_n worst per scale, the vector table."""
    scales = sorted({float(r["noise_scale"]) for r in records})
    examples: list[dict] = []
    index: dict[tuple, int] = {}
    ranking = []
    for scale in scales:
        at_scale = [r for r in records if float(r["noise_scale"]) == scale]
        if scale == 0:  # a zero vector is no vector: one card per prompt, not per vector
            firsts = {}
            for record in sorted(at_scale, key=lambda r: r["noise_id"]):
                firsts.setdefault(record["prompt_index"], record)
            at_scale = list(firsts.values())
        lists = {}
        for name, metric in (("total", "total_logprob"), ("mean", "mean_logprob")):
            ranked = [r for r in at_scale if r.get(metric) is not None]  # unscored: no rank
            worst = sorted(ranked, key=lambda r, m=metric: (r[m], r["noise_id"],
                                                            r["prompt_index"]))[:top_n]
            chosen = []
            for record in worst:
                key = (record["noise_id"], scale, record["prompt_index"])
                if key not in index:
                    index[key] = len(examples)
                    examples.append({**_example(record), "any_noise": scale == 0})
                chosen.append(index[key])
            lists[name] = chosen
        ranking.append(lists)
    drops = vector_drops(records)
    for drop in drops:
        drop["per_scale"] = _aligned(drop["per_scale"], scales)
    return {
        "run": run_name, "model": config.get("model_name"),
        "reference_model": records[0].get("reference_model") if records else None,
        "layer_index": config.get("layer_index"), "site": config.get("site", "resid_pre"),
        "n_records": len(records), "n_empty": sum(_empty(r) for r in records),
        "n_unscored": sum(bool(r.get("unscored")) for r in records),
        "scales": scales, "page_size": PAGE_SIZE,
        "chart": _chart(records, scales), "examples": examples,
        "ranking": ranking, "vectors": drops,
    }


def render_html(payload: dict) -> str:
    """The template with the payload embedded as inert, escaped JSON."""
    template = resources.files("residlab.noising").joinpath("viz_template.html").read_text("utf-8")
    blob = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    blob = blob.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    blob = blob.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return template.replace("/*PAYLOAD*/", blob)


def run_viz(run_dir: str | Path, *, top_n: int = 100) -> Path:
    """Build ``RUN/viz.html`` from ``RUN/eval_logprobs.jsonl``."""
    if top_n < 1:
        raise UsageError(f"--top_n must be at least 1, not {top_n}")
    run = RunDir(Path(run_dir)).check()
    scored = run.path / EVAL_FILE
    if not scored.is_file():
        raise UsageError(f"{scored} not found; run 'residlab noise eval --run_dir {run.path}' "
                         "first")
    records = read_jsonl(scored)
    if not records:
        raise UsageError(f"{scored} is empty; rerun 'residlab noise eval'")
    import yaml

    config = yaml.safe_load(run.config_file.read_text())
    payload = build_payload(records, top_n=top_n, run_name=run.path.name, config=config)
    out = run.path / "viz.html"
    write_text(out, render_html(payload))
    return out


if __name__ == "__main__":
    from residlab.cli import run_module

    raise SystemExit(run_module("noise", "viz"))
