"""Aggregates of scored generations, shared by the console summary and the viewer.

A record without a score (``null``: nothing to score, or not scorable) is left out of every
aggregate; counting it as 0.0 would make it the best score there is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np

__all__ = ["METRICS", "scale_quantiles", "vector_drops", "vector_means"]

METRICS = ("mean_logprob", "total_logprob")


def _scored(records: list[dict], metric: str) -> Iterator[tuple[dict, float]]:
    """``(record, value)`` for the records that have a value of ``metric``."""
    for record in records:
        value = record.get(metric)
        if value is not None:
            yield record, value


def vector_means(
    records: list[dict], metric: str = "mean_logprob"
) -> dict[int, dict[float, float]]:
    """``{noise_id: {scale: average metric over prompts}}``."""
    sums: dict[tuple[int, float], list[float]] = defaultdict(list)
    for record, value in _scored(records, metric):
        sums[record["noise_id"], float(record["noise_scale"])].append(value)
    out: dict[int, dict[float, float]] = defaultdict(dict)
    for (noise_id, scale), values in sorted(sums.items()):
        out[noise_id][scale] = float(np.mean(values))
    return dict(out)


def vector_drops(records: list[dict], metric: str = "mean_logprob") -> list[dict]:
    """Noise vectors ranked by how much they hurt: the fall of the metric at the largest
    scale relative to scale 0 (or the smallest scale when 0 is absent)."""
    means = vector_means(records, metric)
    scales = sorted({scale for per in means.values() for scale in per})
    if not scales:
        return []
    baseline, top = (0.0 if 0.0 in scales else scales[0]), scales[-1]
    drops = []
    for noise_id, per in means.items():
        if baseline in per and top in per:
            drops.append({"noise_id": noise_id, "drop": per[baseline] - per[top],
                          "baseline": baseline, "scale": top, "per_scale": per})
    return sorted(drops, key=lambda d: (-d["drop"], d["noise_id"]))


def scale_quantiles(records: list[dict], metric: str = "mean_logprob") -> list[dict]:
    """Per scale with any value: count and the 5/25/50/75/95th percentiles of the metric."""
    by_scale: dict[float, list[float]] = defaultdict(list)
    for record, value in _scored(records, metric):
        by_scale[float(record["noise_scale"])].append(value)
    out = []
    for scale in sorted(by_scale):
        values = np.array(by_scale[scale])
        q = np.percentile(values, [5, 25, 50, 75, 95])
        out.append({"scale": scale, "n": len(values), "mean": float(values.mean()),
                    "q": [float(x) for x in q]})
    return out
