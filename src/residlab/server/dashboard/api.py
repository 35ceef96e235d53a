"""``GET /api/data/{endpoint}``: the dashboard's read-only JSON API over the experiment folders.

Each request is answered by :meth:`residlab.server.dashboard.data.DashboardData.answer` in
a worker thread (file reads and on-demand lens/attention must not block the event loop). Errors
are ``{"error": "one line"}``: 404 unknown endpoint or missing data, 400 a bad parameter value
(through the app's ``UsageError`` handler), 409 a lens or attention that only a loaded model
could compute while none is loaded. ``GET /noising/{run}/viz.html`` serves a noising run's
viewer, found by listing the noising folder, sandboxed (its inline scripts run in an opaque
origin that cannot read this server's API).
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from residlab.server.dashboard.data import ENDPOINTS, DashboardData
from residlab.server.dashboard.files import ModelUnavailable
from residlab.server.dashboard.noising import viz_path

__all__ = ["dashboard_router"]

HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
VIZ_HEADERS = {**HEADERS, "Referrer-Policy": "no-referrer",
               "Content-Security-Policy": "sandbox allow-scripts; default-src 'none'; "
                                          "script-src 'unsafe-inline'; style-src "
                                          "'unsafe-inline'; img-src data:"}


def dashboard_router(data: DashboardData) -> APIRouter:
    """The data routes of the dashboard page (and of anything else that reads experiments)."""
    router = APIRouter(tags=["dashboard"])

    @router.get("/api/data/{endpoint}", summary="Dashboard data (see the endpoint list)")
    async def data_endpoint(endpoint: str, request: Request) -> Response:
        """One of the endpoints of ``dashboard.data.ENDPOINTS``; parameters in the query
        string."""
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

    @router.get("/noising/{run}/viz.html", summary="A noising run's viewer (sandboxed)")
    async def noising_viz(run: str) -> Response:
        """The ``viz.html`` that ``residlab noise viz`` wrote into a run of the noising dir."""
        path = await run_in_threadpool(viz_path, data, run)
        if path is None:
            return JSONResponse({"error": f"no viz.html in noising run {run!r}; make it with "
                                          "'residlab noise viz --run-dir RUN_DIR'"},
                                status_code=404, headers=HEADERS)
        body = await run_in_threadpool(path.read_bytes)
        return Response(body, media_type="text/html", headers=VIZ_HEADERS)

    return router
