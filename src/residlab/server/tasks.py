"""Background tasks: a capture or an extract-viz run that outlives its request.

Tasks run one after another on one worker thread (:class:`TaskRunner`), each holding the
model lock for its whole run (the stage functions batch their own forwards), so generations
and chat tokens wait while it holds the model. At most :data:`MAX_PENDING` tasks wait; more
are refused (429). ``GET /tasks/{id}`` reads the record: status ``queued`` -> ``running`` ->
``done`` | ``error``, the last progress line the stage logged from the worker while it ran
(``progress``), the result, or the error as one line. Finished records beyond
:data:`KEEP_FINISHED` are dropped, oldest first.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from residlab.errors import UsageError
from residlab.options import StorageDType
from residlab.server.state import ServerState

__all__ = ["KEEP_FINISHED", "MAX_PENDING", "CaptureRequest", "ExtractVizRequest", "TaskRecord",
           "TaskRunner", "active_tasks", "start_task", "tasks_router"]

log = logging.getLogger(__name__)

KEEP_FINISHED = 100
MAX_PENDING = 16  # tasks waiting for the worker; more are refused
Status = Literal["queued", "running", "done", "error"]


@dataclass
class TaskRecord:
    """What ``GET /tasks/{id}`` answers."""

    id: str
    kind: str
    status: Status = "queued"
    progress: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _ProgressLines(logging.Handler):
    """Keeps the latest ``residlab`` log line emitted by one thread as the task's progress."""

    def __init__(self, record: TaskRecord, thread_id: int):
        super().__init__(level=logging.INFO)
        self.task, self.thread_id = record, thread_id

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread_id:
            self.task.progress = record.getMessage()


def active_tasks(state: ServerState) -> int:
    return sum(task.status in ("queued", "running") for task in state.tasks.values())


def _forget_old(state: ServerState) -> None:
    finished = [t for t in state.tasks.values() if t.status in ("done", "error")]
    for task in sorted(finished, key=lambda t: t.created)[:max(len(finished) - KEEP_FINISHED, 0)]:
        state.tasks.pop(task.id, None)


def _run(state: ServerState, task: TaskRecord, work: Callable[[], dict[str, Any]]) -> None:
    logger = logging.getLogger("residlab")
    handler = _ProgressLines(task, threading.get_ident())
    logger.addHandler(handler)
    try:
        with state.model_lock:
            task.status, task.started = "running", time.time()
            if state.loaded is None:
                raise UsageError("no model is loaded; POST /model/load first")
            task.result = work()
        task.status = "done"
    except UsageError as error:
        task.status, task.error = "error", " ".join(str(error).split())
    except Exception as error:  # a bug: keep the traceback in the server log
        log.error("task %s (%s) failed:\n%s", task.id, task.kind, traceback.format_exc())
        task.status, task.error = "error", f"internal error: {type(error).__name__}: {error}"
    finally:
        task.finished = time.time()
        logger.removeHandler(handler)


Work = Callable[[], dict[str, Any]]
_runner_guard = threading.Lock()


class TaskRunner:
    """One worker thread runs the queued tasks in order. It exits when the queue is empty and
    the next task starts a new one, so an idle server holds no thread."""

    def __init__(self, state: ServerState, max_pending: int = MAX_PENDING):
        self.state, self.max_pending = state, max_pending
        self._queue: deque[tuple[TaskRecord, Work]] = deque()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def submit(self, task: TaskRecord, work: Work) -> None:
        """Queue ``work``; 429 when :attr:`max_pending` tasks are already waiting."""
        with self._lock:
            if len(self._queue) >= self.max_pending:
                raise HTTPException(429, f"{len(self._queue)} tasks are already waiting; wait "
                                         "for one to finish (GET /tasks/{id}) and try again")
            self._queue.append((task, work))
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="residlab-tasks",
                                                daemon=True)
                self._worker.start()

    def pending(self) -> int:
        return len(self._queue)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                task, work = self._queue.popleft()
            _run(self.state, task, work)


def _runner(state: ServerState) -> TaskRunner:
    with _runner_guard:
        if state.task_runner is None:
            state.task_runner = TaskRunner(state)
        return state.task_runner


def start_task(state: ServerState, kind: str, work: Work) -> TaskRecord:
    """Queue ``work`` (run under the model lock by the server's task worker); returns its
    record. Refused with 429 when :data:`MAX_PENDING` tasks are waiting."""
    _forget_old(state)
    task = TaskRecord(id=uuid.uuid4().hex, kind=kind)
    state.tasks[task.id] = task  # before the worker can see it
    try:
        _runner(state).submit(task, work)
    except HTTPException:
        del state.tasks[task.id]
        raise
    return task


# --- routes ------------------------------------------------------------------------------------

_NAME = r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*(/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*$"  # no .., no /x


class _PromptSetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_set: str = Field(..., pattern=_NAME, max_length=200)
    layers: str | None = Field(None, description="e.g. 25,27,30 or 10-45:3 (default: all)")
    skip_existing: bool = False


class CaptureRequest(_PromptSetRequest):
    capture_mlp: bool = False
    response_only: bool = False
    responses_from: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$")
    dtype: StorageDType = "bf16"
    batch_size: int | None = Field(None, ge=1, le=4096)


class ExtractVizRequest(_PromptSetRequest):
    attention: bool = False
    logit_lens: bool = False
    top_k: int = Field(50, ge=1, le=10_000)
    limit: int | None = Field(None, ge=1)
    format: Literal["safetensors", "json"] = "safetensors"


def _experiment_variant(state: ServerState):
    """The served experiment and variant that task outputs belong to."""
    if state.experiment is None:
        raise UsageError("this task writes into an experiment; restart the server with "
                         "--experiment")
    if state.variant is None:
        raise UsageError("the served model is not one of the experiment's variants; POST "
                         "/model/load {\"variant\": ...} first")
    return state.experiment, state.variant


def _capture_work(state: ServerState, request: CaptureRequest) -> Callable[[], dict[str, Any]]:
    _experiment_variant(state)  # refused now rather than as a failed task

    def work() -> dict[str, Any]:
        from residlab.inference.capture import capture_prompt_set

        experiment, variant = _experiment_variant(state)  # the model may have changed since

        result = capture_prompt_set(
            experiment, request.prompt_set, variant=variant,
            responses_from=request.responses_from, layers=request.layers,
            capture_mlp=request.capture_mlp, response_only=request.response_only,
            skip_existing=request.skip_existing, dtype=request.dtype,
            batch_size=request.batch_size, loaded=state.loaded)
        return {"out_dir": str(result.out_dir), "written": len(result.written),
                "skipped": result.skipped}

    return work


def _extract_viz_work(state: ServerState,
                      request: ExtractVizRequest) -> Callable[[], dict[str, Any]]:
    _experiment_variant(state)
    if not (request.attention or request.logit_lens):
        raise UsageError("nothing to extract: set attention and/or logit_lens to true")

    def work() -> dict[str, Any]:
        from residlab.inference.extract_viz import extract_viz

        experiment, variant = _experiment_variant(state)

        result = extract_viz(
            experiment, request.prompt_set, variant=variant, attention=request.attention,
            logit_lens=request.logit_lens, layers=request.layers, top_k=request.top_k,
            limit=request.limit, skip_existing=request.skip_existing,
            json_attention=request.format == "json", loaded=state.loaded)
        return {"out_dir": str(result.out_dir), "written": len(result.written),
                "skipped": result.skipped}

    return work


def tasks_router(state: ServerState) -> APIRouter:
    """``POST /capture``, ``POST /extract-viz`` (202 + task id) and ``GET /tasks/{id}``."""
    router = APIRouter(tags=["tasks"])

    @router.post("/capture", status_code=202)
    async def capture(request: CaptureRequest) -> dict[str, Any]:
        return start_task(state, "capture", _capture_work(state, request)).to_json()

    @router.post("/extract-viz", status_code=202)
    async def extract_viz(request: ExtractVizRequest) -> dict[str, Any]:
        return start_task(state, "extract-viz", _extract_viz_work(state, request)).to_json()

    @router.get("/tasks/{task_id}")
    async def task(task_id: str) -> dict[str, Any]:
        record = state.tasks.get(task_id)
        if record is None:
            raise HTTPException(404, f"no task {task_id!r} (finished tasks are kept only "
                                     f"for the last {KEEP_FINISHED})")
        return record.to_json()

    return router
