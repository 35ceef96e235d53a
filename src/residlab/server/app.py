"""The app factory: security middleware, JSON errors, and one router per area.

Nothing happens at import time; :func:`create_app` takes the state and the settings. Routers:
the model server (:mod:`residlab.server.model_api`), background tasks
(:mod:`residlab.server.tasks`), the Live Chat stream (:mod:`residlab.server.chat`), the
dashboard's read-only data (``/api/data/{endpoint}``, :mod:`~residlab.server.dashboard.api`),
and the static pages (the dashboard at ``/``, Live Chat at ``/chat``, ``/static/{name}``).
Static routes serve only the regular files found directly in the static folder or its
``vendor/`` folder, looked up by name in that listing, so ``..``, encoded ``%2e%2e``, absolute
paths and symlinks never reach the disk.

Every error is ``{"error": "..."}`` with its status: 400 bad input (malformed JSON, a
:class:`~residlab.errors.UsageError`), 401 token, 403 another origin or a refused model load,
404 unknown route / file / task, 409 no model loaded or a load in progress, 413 body or answer
too large, 415 a body that is not JSON, 422 a field out of range or a body that is not an
object, 429 too many tasks or streams, 500 a bug (logged, no traceback in the answer).

The OpenAPI document is at ``/openapi.json``; the ``/docs`` and ``/redoc`` pages are off (they
load scripts from a CDN into this origin).
"""

from __future__ import annotations

import logging
import mimetypes
import traceback
from collections.abc import Sequence
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from residlab.errors import NotFound, UsageError
from residlab.server.chat import chat_router
from residlab.server.dashboard.api import dashboard_router
from residlab.server.dashboard.data import DashboardData
from residlab.server.model_api import model_router
from residlab.server.security import DEFAULT_MAX_BODY_BYTES, LOOPBACK_NAMES, SecurityMiddleware
from residlab.server.state import ServerState
from residlab.server.tasks import tasks_router

__all__ = ["STATIC_DIR", "create_app", "static_files"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
PAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
}
TEXT_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
              ".html": "text/html", ".json": "application/json", ".map": "application/json",
              ".txt": "text/plain", "": "text/plain"}


def static_files(root: Path) -> dict[str, Path]:
    """``{name: path}`` of what ``/static/{name}`` may serve: regular, non-hidden files
    directly in ``root`` or ``root/vendor`` (no symlinks, nothing resolving outside)."""
    files: dict[str, Path] = {}
    top = root.resolve()
    for folder, prefix in ((root, ""), (root / "vendor", "vendor/")):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in folder.iterdir():
            if (path.name.startswith(".") or path.is_symlink() or not path.is_file()
                    or not path.resolve().is_relative_to(top)):
                continue
            files[prefix + path.name] = path
    return files


def _media_type(path: Path) -> str:
    known = TEXT_TYPES.get(path.suffix.lower())
    if known is not None:
        return f"{known}; charset=utf-8"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _serve(root: Path, name: str) -> Response:
    path = static_files(root).get(name)
    if path is None:
        return JSONResponse({"error": f"no file {name!r} here"}, status_code=404)
    return Response(path.read_bytes(), media_type=_media_type(path), headers=PAGE_HEADERS)


def _add_static_routes(app: FastAPI, root: Path) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _serve(root, "index.html")

    @app.get("/chat", include_in_schema=False)
    async def chat_page() -> Response:
        return _serve(root, "chat.html")

    @app.get("/static/{name:path}", include_in_schema=False)
    async def static(name: str) -> Response:
        return _serve(root, name)


def _validation_message(error: RequestValidationError) -> tuple[int, str]:
    """``(status, one line)``: 400 for a body that is not JSON, 422 for fields or a body that
    is JSON but not an object."""
    errors = error.errors()
    if any(e.get("type") == "json_invalid" or (tuple(e.get("loc", ())) == ("body",)
           and isinstance(e.get("input"), bytes)) for e in errors):
        return 400, "the request body is not valid JSON (send a JSON object as " \
                    "application/json)"
    if any(tuple(e.get("loc", ())) == ("body",) and not isinstance(e.get("input"), dict)
           for e in errors):
        return 422, "the request body must be a JSON object ({...})"
    parts = []
    for item in errors[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return 422, "; ".join(parts)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(error)
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(UsageError)
    async def usage_error(request: Request, error: UsageError) -> JSONResponse:
        status = 404 if isinstance(error, NotFound) else 400
        return JSONResponse({"error": " ".join(str(error).split())}, status_code=status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed:\n%s", request.method, request.url.path,
                  "".join(traceback.format_exception(error)))
        return JSONResponse({"error": f"internal error ({type(error).__name__}); the server "
                                      "log has the traceback"}, status_code=500)


def _dashboard_data(state: ServerState, root: str | Path | None,
                    experiments: Sequence[str] | None,
                    noising_dir: str | Path | None = None) -> DashboardData:
    """What the dashboard serves: the served experiment alone unless others are named."""
    if root is None and state.experiment is not None:
        root = state.experiment.path.parent
    if root is None:
        from residlab.experiments import experiments_root

        root = experiments_root()
    if experiments is None and state.experiment is not None:
        experiments = [state.experiment.name]
    return DashboardData(Path(root), experiments, state, noising_dir=noising_dir)


def _replica_router() -> APIRouter:
    """409 for what needs one process: its state would live in the replica that answered."""
    router = APIRouter()
    message = ("{what} needs a single server process, and this one is one of several Ray "
               "Serve replicas (the next request may reach another); run it on a plain "
               "'residlab serve'")

    def refuse(what: str):
        async def answer() -> JSONResponse:
            return JSONResponse({"error": message.format(what=what)}, status_code=409)
        return answer

    for method, path, what in (("POST", "/capture", "a background task"),
                               ("POST", "/extract-viz", "a background task"),
                               ("GET", "/tasks/{task_id}", "a background task"),
                               ("POST", "/model/load", "loading another model")):
        router.add_api_route(path, refuse(what), methods=[method], include_in_schema=False)
    return router


def create_app(state: ServerState, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               static_dir: str | Path | None = None,
               allowed_hosts: frozenset[str] | set[str] | None = LOOPBACK_NAMES,
               allow_model_load: bool = False, experiments_root: str | Path | None = None,
               experiments: Sequence[str] | None = None,
               noising_dir: str | Path | None = None, replicated: bool = False) -> FastAPI:
    """The server's app. ``allowed_hosts=None`` turns the Host check off (a non-loopback bind,
    where the token guards instead); ``static_dir`` defaults to the package's page;
    ``allow_model_load`` lets ``POST /model/load`` load any hub id or server path (otherwise
    only the served experiment's variants). The dashboard reads the experiments under
    ``experiments_root`` (default: the served experiment's folder, else
    ``RESIDLAB_EXPERIMENTS_DIR`` or ``./experiments``):
    ``experiments``, else only the served experiment, else all of them; the Noising view lists
    the runs under ``noising_dir`` (the noising runner's ``output_dir``; None: none).
    ``replicated``: one replica of several (Ray Serve), where background tasks and model
    loading answer 409 (a task's status, or a loaded model, would live in one replica only)."""
    app = FastAPI(title="residlab", summary="Model server and Live Chat for residlab",
                  version="1", docs_url=None, redoc_url=None)
    app.state.residlab = state
    if replicated:
        app.include_router(_replica_router())  # first: its routes win
    app.include_router(model_router(state, allow_model_load=allow_model_load))
    app.include_router(tasks_router(state))
    app.include_router(chat_router(state))
    app.include_router(dashboard_router(_dashboard_data(state, experiments_root, experiments,
                                                        noising_dir)))
    _add_static_routes(app, Path(static_dir) if static_dir is not None else STATIC_DIR)
    _add_error_handlers(app)
    app.add_middleware(SecurityMiddleware, token=state.token, max_body_bytes=max_body_bytes,
                       allowed_hosts=allowed_hosts)
    return app
