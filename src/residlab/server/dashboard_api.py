"""``GET /api/data/{endpoint}``: the dashboard's read-only JSON API over the experiment folders.

Each request is answered by :meth:`residlab.server.dashboard_data.DashboardData.answer` in a
worker thread (file reads and on-demand lens/attention must not block the event loop). Errors
are ``{"error": "one line"}``: 404 unknown endpoint or missing data, 400 a bad parameter value
(through the app's ``UsageError`` handler), 409 a lens or attention that only a loaded model
could compute while none is loaded.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from residlab.server.dashboard_data import ENDPOINTS, DashboardData, ModelUnavailable

__all__ = ["dashboard_router"]

HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def dashboard_router(data: DashboardData) -> APIRouter:
    """The data routes of the dashboard page (and of anything else that reads experiments)."""
    router = APIRouter(tags=["dashboard"])

    @router.get("/api/data/{endpoint}", summary="Dashboard data (see the endpoint list)")
    async def data_endpoint(endpoint: str, request: Request) -> Response:
        """One of ``experiments, experiment, prompts, response, projections, norms, spans,
        lens, attention``; parameters in the query string."""
        if endpoint not in ENDPOINTS:
            return JSONResponse({"error": f"unknown data endpoint {endpoint!r}; use one of "
                                          f"{', '.join(ENDPOINTS)}"}, status_code=404,
                                headers=HEADERS)
        params = dict(request.query_params)
        try:
            answer = await run_in_threadpool(data.answer, endpoint, params)
        except ModelUnavailable as error:
            return JSONResponse({"error": " ".join(str(error).split())}, status_code=409,
                                headers=HEADERS)
        return Response(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json", headers=HEADERS)

    return router
