"""The dashboard's read-only data: every answer of ``GET /api/data/{endpoint}``, without FastAPI.

:class:`DashboardData` is :class:`~residlab.server.dashboard.files.DashboardFiles` (listings,
cache, parameters) plus the dispatch: each endpoint goes to the area module that registered
it in its ``HANDLERS``, and :meth:`DashboardData.export_keys` (every request the page can make,
for the static export) chains the areas' ``export_keys``. This is the one module that imports
the areas; no area imports it (they take a ``DashboardFiles``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

from residlab.errors import NotFound
from residlab.server.dashboard import (
    analysis,
    deepdive,
    diff_spans,
    extraction,
    inference,
    keys,
    noising,
    overview,
    spans,
    steering,
)
from residlab.server.dashboard.files import DashboardFiles, Params

__all__ = ["ENDPOINTS", "PART1_ENDPOINTS", "PART2_ENDPOINTS", "DashboardData"]

PART1_ENDPOINTS = ("experiments", "experiment", "prompts", "response", "projections", "norms",
                   "spans", "lens", "attention")
PART2_ENDPOINTS = ("overview", "extraction", "vector_lens", "contrastive", "steering",
                   "steering_responses", "calibration", "model_diff", "logprob_diff",
                   "diff_spans", "noising_runs", "noising_run")
ENDPOINTS = PART1_ENDPOINTS + PART2_ENDPOINTS

Handler = Callable[[DashboardFiles, Params], dict]
KeyMaker = Callable[[DashboardFiles, str], Iterator[tuple[str, dict[str, str]]]]

# Areas that answer endpoints, and (in the order the export asks) those that list the page's
# requests: part 1's keys (Inference, Top Spans, Layer Deep Dive), then each part-2 area's.
AREAS: tuple[ModuleType, ...] = (inference, spans, deepdive, overview, extraction, steering,
                                 analysis, diff_spans, noising)
KEY_AREAS: tuple[ModuleType, ...] = (keys, overview, extraction, steering, analysis, diff_spans,
                                     noising)


def _table() -> dict[str, Handler]:
    """``{endpoint: handler}`` from the areas' ``HANDLERS``; each endpoint registered once."""
    table: dict[str, Handler] = {}
    for module in AREAS:
        for endpoint, handler in module.HANDLERS.items():
            assert endpoint not in table, f"{endpoint} registered twice"
            table[endpoint] = handler
    assert set(table) == set(ENDPOINTS), sorted(set(table) ^ set(ENDPOINTS))
    return table


HANDLERS = _table()
KEYS: tuple[KeyMaker, ...] = tuple(module.export_keys for module in KEY_AREAS)


class DashboardData(DashboardFiles):
    """Answers of the dashboard's JSON API over ``root`` (see :class:`DashboardFiles` for the
    arguments: the experiments shown, the server state for on-demand lens and attention, the
    noising folder)."""

    def answer(self, endpoint: str, params: Mapping[str, str]) -> dict[str, Any]:
        """The JSON-ready answer of ``GET /api/data/{endpoint}?{params}`` (it may share
        objects with the file cache: serialise it, do not modify it)."""
        handler = HANDLERS.get(endpoint)
        if handler is None:
            raise NotFound(f"unknown data endpoint {endpoint!r}; use one of "
                           f"{', '.join(ENDPOINTS)}")
        return handler(self, Params(params))

    def export_keys(self, experiment: str) -> Iterator[tuple[str, dict[str, str]]]:
        """Every ``(endpoint, params)`` the page can request for ``experiment``, as it sends
        them (files only: nothing is computed on demand): part 1's, then each part-2 area's."""
        for make in KEYS:
            yield from make(self, experiment)
