"""What one server process holds: the model, the experiment it serves, and the model lock.

Every route that runs the model takes ``model_lock`` for the duration of one forward or one
generated token, so requests queue on the model (a generation releases it between tokens, so
concurrent streams interleave instead of waiting for each other to finish).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServerState:
    """Shared by every router of the app (``app.state.residlab``)."""

    loaded: Any | None = None  # residlab.models.LoadedModel (None until /model/load)
    experiment: Any | None = None  # residlab.experiments.Experiment, when serving one
    variant: str | None = None  # the experiment's variant that ``loaded`` is
    token: str | None = None  # required as "Authorization: Bearer ..." when set
    model_lock: threading.Lock = field(default_factory=threading.Lock)
    tasks: dict[str, Any] = field(default_factory=dict)  # background task id -> its record
    active_streams: int = 0  # chat streams running now (health reports it)
    cache: dict[str, Any] = field(default_factory=dict)  # per-feature caches (norm scales...)
    generation: int = 0  # +1 per /model/load: caches key on it (an id() can be reused)
    task_runner: Any | None = None  # residlab.server.tasks.TaskRunner, made on the first task
