"""``residlab serve --ray [--replicas N]``: the same app as a Ray Serve deployment.

Each replica is a Ray actor that builds the server's state once (the experiment's variant or
``--model``, loaded on that replica's GPU) and serves exactly the app ``residlab serve`` serves
(:func:`residlab.server.app.create_app`: model API, Live Chat, dashboard, security middleware).
Ray Serve's HTTP proxy binds ``--host``/``--port`` and spreads requests over the replicas, so
several researchers share a cluster's GPUs with one address.

Replicas: ``--replicas N`` (default: one per GPU of the cluster, else 1), each with one GPU when
the cluster has GPUs. Asking for more replicas than GPUs is refused before anything starts.

What changes with several replicas: every request may reach another replica, so what one
replica remembers is not seen by the next request: background tasks (``POST /capture``,
``/extract-viz``, ``GET /tasks/{id}``) and ``POST /model/load`` answer 409 (run them on a single
``residlab serve``), and the Live Chat's key-value cache is reused only when a follow-up
reaches the same replica (the answers are the same either way, only slower).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from residlab.errors import UsageError

__all__ = ["ResidlabReplica", "deploy", "plan_replicas", "run_ray_serve"]

log = logging.getLogger(__name__)
APP_NAME = "residlab"


class ResidlabReplica:
    """One replica: ``build(*args)`` makes the app (loading the model) when the replica starts;
    Ray Serve then asks for it through ``__serve_build_asgi_app__``. ``build`` is a function
    of an importable module (``residlab.commands.serve.replica_app``), sent by reference."""

    def __init__(self, build: Callable[..., Any], *args: Any) -> None:
        self._residlab_app = build(*args)  # (``app`` is a property of the wrapper)

    def __serve_build_asgi_app__(self):
        return self._residlab_app


def plan_replicas(requested: int | None, cluster_gpus: float) -> tuple[int, float]:
    """``(replicas, GPUs per replica)``: one GPU each when the cluster has any."""
    gpus = int(cluster_gpus)
    if requested is not None and requested < 1:
        raise UsageError(f"--replicas {requested}: use at least 1")
    if gpus == 0:
        return requested or 1, 0.0
    replicas = requested or gpus
    if replicas > gpus:
        raise UsageError(f"--replicas {replicas} needs {replicas} GPUs (one per replica) but "
                         f"the cluster has {gpus}; use --replicas {gpus} or fewer")
    return replicas, 1.0


def _connect(address: str | None):
    from residlab.executors.ray_executor import check_reachable, import_ray

    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_reachable(address)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return ray


def deploy(options, token: str | None, build: Callable[..., Any], *,
           blocking: bool = True) -> tuple[int, float]:
    """Start Serve's proxy on ``--host``/``--port`` and the replicas, each running
    ``build(options_dict, token, replicated)``; ``(replicas, GPUs per replica)``. ``blocking``
    waits until interrupted, then shuts the deployment down."""
    ray = _connect(options.ray_address)
    from ray import serve

    replicas, gpus = plan_replicas(options.replicas, ray.cluster_resources().get("GPU", 0))
    deployment = serve.deployment(
        name=APP_NAME, num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus, "num_cpus": 1},
    )(serve.ingress()(ResidlabReplica))
    serve.start(http_options={"host": options.host, "port": options.port})
    shown = f"[{options.host}]" if ":" in options.host else options.host
    print(f"residlab serve (Ray Serve, {replicas} replica(s), {gpus:g} GPU each): "
          f"http://{shown}:{options.port}/", flush=True)
    application = deployment.bind(build, options.model_dump(), token, replicas > 1)
    if not blocking:
        serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
        return replicas, gpus
    try:
        serve.run(application, name=APP_NAME, route_prefix="/", blocking=True)
    finally:
        serve.shutdown()
    return replicas, gpus


def run_ray_serve(options, token: str | None, build: Callable[..., Any]) -> None:
    """``residlab serve --ray``: deploy and block (Ctrl-C shuts the deployment down)."""
    deploy(options, token, build, blocking=True)
