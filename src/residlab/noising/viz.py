"""Write ``RUN/viz.html``: one self-contained page to find, see and compare the worst
generations of a noising run (no network needed: the chart is hand-drawn SVG).

All text reaches the page as JSON inside a ``<script type="application/json">`` block, with
``<``, ``>`` and ``&`` escaped, and is put into the document with ``textContent`` only, so a
prompt containing markup shows as text and runs nothing.

    python -m residlab.noising.viz --config configs/example.yaml --run_dir RUN --top_n 100
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path

from residlab.errors import UsageError
from residlab.noising.eval import EVAL_FILE
from residlab.noising.runs import RunDir
from residlab.noising.stats import METRICS, scale_quantiles, vector_drops, vector_means
from residlab.store import read_jsonl, write_text

__all__ = ["build_payload", "render_html", "run_viz", "x_axis"]

PAGE_SIZE = 10
MIN_TICK_GAP = 0.045  # fraction of the axis width between two labelled ticks
DIGEST = re.compile(r"@[0-9a-f]{7,64}$")  # the file hash that scoring settings append


def _aligned(per_scale: dict[float, float], scales: list[float]) -> list[float | None]:
    return [per_scale.get(scale) for scale in scales]


def _symlog(value: float, constant: float) -> float:
    """Logarithmic for |value| >> constant, linear near 0, so a zero norm still has a place."""
    return math.copysign(math.log10(1 + abs(value) / constant), value)


def x_axis(scales: list[float]) -> dict:
    """Where each noise norm sits on the chart's x axis, as a fraction of its width.

    Positions are proportional to the norms; when the positive norms span a decade or more
    the axis is symlog instead (log for large norms, linear through 0), so 1, 10 and 100 do
    not crowd into the left edge. Ticks are the norms themselves, thinned where they would
    overlap.
    """
    positive = [s for s in scales if s > 0]
    log_like = len(positive) > 1 and max(positive) / min(positive) >= 10
    constant = min(positive) if log_like else 1.0
    mapped = [_symlog(s, constant) if log_like else s for s in scales]
    lo, hi = (min(mapped), max(mapped)) if mapped else (0.0, 0.0)
    positions = [0.5 if hi == lo else (m - lo) / (hi - lo) for m in mapped]
    ticks: list[dict] = []
    for scale, pos in zip(scales, positions, strict=True):
        if not ticks or pos - ticks[-1]["pos"] >= MIN_TICK_GAP:
            ticks.append({"value": scale, "pos": pos})
    return {"kind": "symlog" if log_like else "linear", "constant": constant,
            "positions": positions, "ticks": ticks}


def _distinct(records: list[dict], share_zero: bool) -> list[dict]:
    """One record per generation: under greedy decoding every vector's zero-norm row is the
    same generation, so each prompt's scale-0 rows count once (the lowest noise id)."""
    if not share_zero:
        return records
    firsts: dict[int, dict] = {}
    rest = []
    for record in sorted(records, key=lambda r: r["noise_id"]):
        if float(record["noise_scale"]) == 0:
            firsts.setdefault(record["prompt_index"], record)
        else:
            rest.append(record)
    return list(firsts.values()) + rest


def _chart(records: list[dict], distinct: list[dict], scales: list[float]) -> dict:
    out = {}
    for metric in METRICS:
        # Boxes describe generations, so a shared zero-norm answer is one point, not V.
        quantiles = {q["scale"]: q for q in scale_quantiles(distinct, metric)}
        vectors = vector_means(records, metric)
        ranked = [drop["noise_id"] for drop in vector_drops(records, metric)]
        out[metric] = {  # a scale where nothing has a score gets null
            "quantiles": [quantiles.get(scale) for scale in scales],
            "vectors": {str(i): _aligned(per, scales) for i, per in vectors.items()},
            "worst": ranked + sorted(set(vectors) - set(ranked)),  # no drop: last
        }
    return out


def _empty(record: dict) -> bool:
    """Scored, but with no token to score (an empty response)."""
    return not record.get("unscored") and record.get("mean_logprob") is None


def _example(record: dict) -> dict:
    keys = ("noise_id", "noise_scale", "prompt_index", "messages", "tokens",
            "per_token_logprobs", "total_logprob", "mean_logprob", "n_tokens", "finish_reason",
            "unscored")
    return {key: record.get(key) for key in keys}


def _rankings(records: list[dict], scales: list[float], top_n: int, share_zero: bool):
    """Per scale, the top_n worst (indices into the returned examples) by total and mean."""
    examples: list[dict] = []
    index: dict[tuple, int] = {}
    ranking = []
    for scale in scales:
        at_scale = [r for r in records if float(r["noise_scale"]) == scale]
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
                    examples.append({**_example(record), "any_noise": scale == 0 and share_zero})
                chosen.append(index[key])
            lists[name] = chosen
        ranking.append(lists)
    return examples, ranking


def _unnoised(distinct: list[dict], examples: list[dict]) -> dict[str, dict]:
    """The scale-0 answer to each prompt that a shown card asks, keyed by prompt index."""
    wanted = {ex["prompt_index"] for ex in examples if float(ex["noise_scale"]) != 0}
    out: dict[str, dict] = {}
    for record in sorted(distinct, key=lambda r: r["noise_id"]):
        if float(record["noise_scale"]) == 0 and record["prompt_index"] in wanted:
            out.setdefault(str(record["prompt_index"]), _example(record))
    return out


def _reference(records: list[dict]) -> str | None:
    """The scorer's model id as scoring recorded it (the hub id or file, not 'default')."""
    if not records:
        return None
    named = (records[0].get("settings") or {}).get("reference")
    return DIGEST.sub("", named) if named else records[0].get("reference_model")


def _header(config: dict, records: list[dict]) -> dict:
    provenance = config.get("provenance") or {}
    settings = (records[0].get("settings") or {}) if records else {}
    return {"model": provenance.get("model") or config.get("model_name"),
            "reference_model": _reference(records), "reference_dtype": settings.get("dtype"),
            "layer_index": config.get("layer_index"), "site": config.get("site", "resid_pre"),
            "positions": config.get("positions", "all"), "dtype": config.get("dtype"),
            "do_sample": bool(config.get("do_sample", False))}


def build_payload(records: list[dict], *, top_n: int, run_name: str, config: dict) -> dict:
    """Everything the page shows: chart data, the top_n worst per scale, the vector table."""
    scales = sorted({float(r["noise_scale"]) for r in records})
    share_zero = not config.get("do_sample", False)
    distinct = _distinct(records, share_zero)
    examples, ranking = _rankings(distinct, scales, top_n, share_zero)
    drops = vector_drops(records)
    for drop in drops:
        drop["per_scale"] = _aligned(drop["per_scale"], scales)
    return {
        "run": run_name, **_header(config, records),
        "n_records": len(records), "n_generations": len(distinct),
        "n_vectors": len({r["noise_id"] for r in records}), "shared_zero": share_zero,
        "n_empty": sum(_empty(r) for r in distinct),
        "n_unscored": sum(bool(r.get("unscored")) for r in distinct),
        "scales": scales, "x_axis": x_axis(scales), "page_size": PAGE_SIZE,
        "chart": _chart(records, distinct, scales), "examples": examples,
        "unnoised": _unnoised(distinct, examples), "ranking": ranking, "vectors": drops,
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
