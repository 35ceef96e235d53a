"""``residlab serve``: one process keeps a model loaded for the API, the dashboard (``/``) and
the Live Chat page (``/chat``).

The dashboard shows ``--experiment`` (with ``--no-model``, without loading its model: Live Chat
and on-demand lens/attention then answer 409), or, with neither ``--experiment`` nor
``--model``, every experiment under ``--experiments-dir``.

The bind is checked before anything loads: loopback by default; any other address needs a
token (``--token`` or ``RESIDLAB_TOKEN``; prefer the variable, a flag shows in ``ps``). With a
token, every request carries ``Authorization: Bearer T``; a browser opens ``/chat?token=T``
once and is redirected to ``/chat`` with the token kept as an HttpOnly, SameSite=Strict cookie.
``POST /model/load`` loads the experiment's variants; loading any hub id or path the server can
read needs ``--allow-model-load``.
"""

from __future__ import annotations

from pydantic import Field

from residlab.options import CommandOptions, DType, option

__all__ = ["ServeOptions", "app_for", "build_state", "replica_app", "run_serve"]


class ServeOptions(CommandOptions):
    experiment: str | None = option(None, "serve this experiment (its variants and trait "
                                    "vectors)")
    model_variant: str | None = option(None, "the experiment's variant to load (default: its "
                                       "defaults.application)")
    model: str | None = option(None, "load this model instead (hub id, local folder or "
                               "'default'); none of --experiment/--model: load later with "
                               "POST /model/load")
    dtype: DType = option("bf16", "with --model: bf16, fp16, fp32 or auto")
    device: str = option("auto", "with --model: auto, cpu, cuda, cuda:N or mps")
    host: str = option("127.0.0.1", "address to bind; other than loopback needs a token")
    port: int = Field(8765, ge=1, le=65535, description="port to bind")
    token: str | None = option(None, "require 'Authorization: Bearer TOKEN' (default: "
                               "RESIDLAB_TOKEN)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted")
    allow_model_load: bool = option(False, "let POST /model/load load any hub id or local path "
                                    "(default: only the experiment's variants)")
    no_model: bool = option(False, "serve the dashboard of --experiment without loading its "
                            "model (Live Chat and on-demand lens/attention answer 409)")
    experiments_dir: str | None = option(None, "the experiments folder the dashboard reads "
                                         "(default: RESIDLAB_EXPERIMENTS_DIR or ./experiments)")
    noising_dir: str = option("noising/outputs", "the noising runner's output_dir whose runs the "
                              "dashboard's Noising view lists")
    ray: bool = option(False, "deploy on Ray Serve: one replica per GPU of the cluster (pip "
                       "install 'residlab[ray]')")
    replicas: int | None = Field(None, ge=1, description="with --ray: replicas (default: one "
                                 "per GPU, else 1)")
    ray_address: str | None = option(None, "with --ray: the cluster to join (default: "
                                     "RAY_ADDRESS, else a local Ray)")


def build_state(options: ServeOptions, token: str | None):
    """The server's state with the experiment and model the options name, loaded."""
    from residlab.errors import UsageError
    from residlab.server.state import ServerState

    state = ServerState(token=token)
    if options.model_variant is not None and options.experiment is None:
        raise UsageError("--model-variant names a variant of an experiment; give --experiment")
    if options.model is not None and options.model_variant is not None:
        raise UsageError("give --model-variant or --model, not both")
    if options.no_model and options.model is not None:
        raise UsageError("give --no-model or --model, not both")
    if options.experiment is not None:
        from residlab.experiments import load_experiment

        state.experiment = load_experiment(options.experiment, options.experiments_dir)
    if options.no_model:
        return state
    if options.model is not None:
        from residlab.models import load_model

        state.loaded = load_model(options.model, dtype=options.dtype, device=options.device)
    elif state.experiment is not None:
        from residlab.experiments import load_variant

        state.variant, _ = state.experiment.variant(options.model_variant)
        state.loaded = load_variant(state.experiment, state.variant)
    return state


def app_for(options: ServeOptions, state, *, replicated: bool = False):
    """The app these options describe, around ``state`` (one process, or one Ray Serve
    replica of several: ``replicated``)."""
    from residlab.server.app import create_app
    from residlab.server.security import allowed_hosts_for

    return create_app(state, max_body_bytes=options.max_body_bytes,
                      allowed_hosts=allowed_hosts_for(options.host),
                      allow_model_load=options.allow_model_load,
                      experiments_root=options.experiments_dir,
                      noising_dir=options.noising_dir, replicated=replicated)


def replica_app(options: dict, token: str | None, replicated: bool):
    """One Ray Serve replica's app: the state these options name, loaded on the replica."""
    settings = ServeOptions(**options)
    return app_for(settings, build_state(settings, token), replicated=replicated)


def run_serve(options: ServeOptions) -> None:
    from residlab.errors import UsageError

    try:
        import uvicorn

        import residlab.server.app  # noqa: F401 (the server's extra is installed)
    except ModuleNotFoundError as error:
        raise UsageError(f"the server needs {error.name}: pip install 'residlab[server]'") from None
    from residlab.server.security import check_bind, resolve_token

    if not options.ray and (options.replicas is not None or options.ray_address is not None):
        raise UsageError("--replicas and --ray-address deploy on Ray Serve: add --ray")
    token = resolve_token(options.token)
    check_bind(options.host, token)  # before any model loads
    if options.ray:
        from residlab.server.ray_serve import run_ray_serve

        run_ray_serve(options, token, replica_app)
        return
    state = build_state(options, token)
    app = app_for(options, state)
    shown = f"[{options.host}]" if ":" in options.host else options.host
    url = f"http://{shown}:{options.port}"
    hint = " (open /?token=... once in a browser)" if token else ""
    print(f"residlab serve: dashboard: {url}/{hint}  chat: {url}/chat  API: "
          f"{url}/openapi.json", flush=True)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
