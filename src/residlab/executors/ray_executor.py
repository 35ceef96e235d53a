"""Shards on Ray actors: each worker loads the model once; the driver schedules and writes.

The driver keeps a queue of shards and gives one to each idle worker. A finished shard comes
back through the object store; the driver gives that worker its next shard, then hands the
result to ``on_done`` (which writes it atomically, exactly as a local run does), so writing
is off the workers' critical path. A worker keeps its model for the next job when that job
loads the same one (:meth:`ShardJob.model_key`). A worker that dies (killed, out of host memory, its
node lost) is replaced and its shard goes back to the front of the queue; a shard lost with
its worker more than ``max_retries`` times stops the job. An exception raised by the shard's
own code is not retried (it would fail again): it is raised in the driver as it was raised.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from residlab.errors import UsageError
from residlab.executors.base import ExecutorSettings, Shard, ShardJob

__all__ = ["RayExecutor", "ShardLost"]

log = logging.getLogger(__name__)
INSTALL = "pip install 'residlab[ray]'"


class ShardLost(RuntimeError):
    """A shard's worker died more often than ``max_retries`` allows."""


def import_ray():
    """Ray, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"executor 'ray' needs Ray, which is not installed: {INSTALL} "
                         "(or use --executor local)") from None
    return ray


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast (one line) when nothing listens at ``host:port`` / ``ray://host:port``;
    Ray itself would retry for a minute before giving up."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"Ray address {address!r}: write host:port (e.g. 10.0.0.5:6379) or "
                         "ray://host:10001")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise UsageError(f"cannot reach the Ray cluster at {address!r} "
                         f"({error.strerror or error}); check --ray-address / RAY_ADDRESS and "
                         "that 'ray start --head' runs there") from None


class _Worker:
    """A Ray actor: computes shards of whatever job it is handed, setting each job up (loading
    its model) once. The process outlives one job, so a second job skips starting Python and
    importing torch."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.job_id: str | None = None
        self.job: ShardJob | None = None

    def compute(self, job: list[Any], payload: Any) -> Any:
        """``job`` is ``[ObjectRef]``: wrapped, so Ray hands over the reference and the job is
        fetched and set up only when it changes."""
        (ref,) = job
        if ref.hex() != self.job_id:
            import ray

            previous, self.job, self.job_id = self.job, None, None
            fresh = ray.get(ref)
            key = fresh.model_key()
            if previous is not None and key is not None and key == previous.model_key():
                fresh.loaded = previous.loaded  # the same model: not loaded again
            del previous  # otherwise its model is freed before the next one loads
            fresh.setup()
            self.job, self.job_id = fresh, ref.hex()
        return self.job.pack(self.job.compute(payload))


class RayExecutor:
    """Runs shards on Ray actors. Connects (or starts a local Ray) and checks resources when
    made, so bad input fails before any work.

    ``on_event(event, shard, worker)`` is called in the driver after a shard is handed to
    worker number ``worker`` (``"dispatch"``) and after it is written (``"done"``); tests use
    it to kill a worker mid-job (``ray.kill(executor.worker(n))``)."""

    remote = True

    def __init__(self, settings: ExecutorSettings,
                 on_event: Callable[[str, Shard, int], None] | None = None):
        self.ray = import_ray()
        self.settings = settings
        self.on_event = on_event
        self._started = self._connect()
        self.workers, self.gpus = self._plan()
        self._actors: dict[int, Any] = {}
        self._next_index = 0
        self.deaths = 0  # workers that died with a shard (for tests and logs)

    def _connect(self) -> bool:
        """Join the cluster (``ray_address`` / ``RAY_ADDRESS``) or start a local Ray; True
        when this executor started it (and so shuts it down)."""
        ray = self.ray
        address = self.settings.ray_address or os.environ.get("RAY_ADDRESS") or None
        if address:
            check_reachable(address)
        if ray.is_initialized():
            return False
        try:
            ray.init(address=address, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f"the Ray cluster at {address!r}" if address else "a local Ray"
            first = " ".join(str(error).split())[:200]
            raise UsageError(f"cannot connect to {where}: {first}") from None
        return True

    def _plan(self) -> tuple[int, float]:
        """(workers, GPUs per worker) that the cluster can hold at once."""
        resources = self.ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        s = self.settings
        per_gpu = s.gpus_per_worker if s.gpus_per_worker is not None else float(gpus >= 1)
        if per_gpu > gpus:
            raise UsageError(f"--gpus-per-worker {per_gpu:g}: the Ray cluster has {gpus:g} "
                             "GPU(s); ask for fewer, or join a larger cluster (--ray-address)")
        if s.cpus_per_worker > cpus:
            raise UsageError(f"--cpus-per-worker {s.cpus_per_worker:g}: the Ray cluster has "
                             f"{cpus:g} CPU(s); ask for at most {cpus:g}")
        fit = math.floor(cpus / s.cpus_per_worker)
        if per_gpu:
            fit = min(fit, math.floor(gpus / per_gpu))
        workers = s.workers or max(1, fit)
        if workers > fit:
            raise UsageError(f"--workers {workers} needs {workers * s.cpus_per_worker:g} CPUs "
                             f"and {workers * per_gpu:g} GPUs, the Ray cluster has {cpus:g} "
                             f"and {gpus:g}: use --workers {fit} or less")
        return workers, per_gpu

    def worker(self, index: int) -> Any:
        """The actor handle of worker ``index`` (as named in ``on_event``)."""
        return self._actors[index]

    def _start_worker(self) -> int:
        threads = max(1, int(self.settings.cpus_per_worker))
        actor = self.ray.remote(num_cpus=self.settings.cpus_per_worker, num_gpus=self.gpus,
                                max_restarts=0)(_Worker)
        index = self._next_index
        self._actors[index] = actor.remote(threads)
        self._next_index += 1
        return index

    def run(self, job: ShardJob, shards: Sequence[Shard],
            on_done: Callable[[Shard, Any], None], *, bar: Any = None) -> None:
        """Compute ``shards`` on up to ``workers`` actors; ``on_done`` runs in the driver.
        The actors stay for the next job until :meth:`close`, unless this one fails."""
        if not shards:
            return
        while len(self._actors) < min(self.workers, len(shards)):
            self._start_worker()
        try:
            self._schedule([self.ray.put(job)], list(shards), on_done, bar)
        except BaseException:
            self._kill_all()  # in-flight shards stop now; nothing more will be written
            raise

    def _schedule(self, job: list[Any], shards: list[Shard], on_done, bar) -> None:
        ray = self.ray
        pending, idle = deque(shards), deque(sorted(self._actors))
        in_flight: dict[Any, tuple[int, Shard]] = {}
        lost: Counter[int] = Counter()
        while pending or in_flight:
            while pending and idle:
                self._dispatch(job, idle.popleft(), pending.popleft(), in_flight)
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            index, shard = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                self._lost(shard, lost, error)
                pending.appendleft(shard)
                del self._actors[index]
                idle.append(self._start_worker())
                continue
            except ray.exceptions.RayTaskError as error:
                raise error.as_instanceof_cause() from None
            idle.append(index)
            while pending and idle:  # the worker starts its next shard before this one is written
                self._dispatch(job, idle.popleft(), pending.popleft(), in_flight)
            on_done(shard, result)
            if bar is not None:
                bar.update(shard.size)
            self._event("done", shard, index)

    def _dispatch(self, job: list[Any], index: int, shard: Shard,
                  in_flight: dict[Any, tuple[int, Shard]]) -> None:
        in_flight[self._actors[index].compute.remote(job, shard.payload)] = (index, shard)
        self._event("dispatch", shard, index)

    def _lost(self, shard: Shard, lost: Counter[int], error: Exception) -> None:
        self.deaths += 1
        lost[shard.key] += 1
        why = " ".join(str(error).split())[:300]
        if lost[shard.key] > self.settings.max_retries:
            raise ShardLost(f"shard {shard.key} was lost with its worker {lost[shard.key]} "
                            f"time(s), more than --max-retries {self.settings.max_retries}; "
                            f"last: {why}")
        log.warning("a Ray worker died with shard %s (%s); running it again on another worker",
                    shard.key, why)

    def _event(self, event: str, shard: Shard, index: int) -> None:
        if self.on_event is not None:
            self.on_event(event, shard, index)

    def _kill_all(self) -> None:
        for actor in self._actors.values():
            self.ray.kill(actor, no_restart=True)
        self._actors.clear()

    def close(self) -> None:
        """Stop the workers, and the local Ray this executor started (if it did)."""
        if self.ray.is_initialized():
            self._kill_all()
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
