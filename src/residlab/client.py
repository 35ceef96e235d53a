"""A small Python client of ``residlab serve`` (one method per route), and the model server
as ``residlab responses`` Mode A uses it.

    with ResidlabClient("http://127.0.0.1:8765", token="...") as client:
        client.health()
        client.generate("Why is the sky blue?", max_new_tokens=40)["results"][0]["response"]

A server error becomes :class:`ServerError` (a :class:`~residlab.errors.UsageError`, so the
command line prints its one line). The token defaults to ``RESIDLAB_TOKEN``.

:func:`find_server` decides whether a running server can stand in for loading a variant
here: ``/health`` must answer within a short timeout, and the served model must be the one a
local load would give (model id or file / config hash, LoRA adapter, dtype, device type).
:class:`RemoteModel` then offers what Mode A needs of a loaded model: the tokenizer (loaded
here, no weights), the provenance, and ``generate_ids`` run by the server on the same batches.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from residlab.errors import UsageError

__all__ = ["DEFAULT_URL", "RemoteModel", "ResidlabClient", "ServerError", "find_server"]

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8765"
SERVER_ENV = "RESIDLAB_SERVER"
HEALTH_TIMEOUT = 1.0  # seconds: a server that is not there answers (refuses) at once
IDENTITY_KEYS = ("model", "source", "file", "sha256", "config_sha256")


class ServerError(UsageError):
    """The server answered with an error status; ``status`` and its one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status, self.message = status, message


class ResidlabClient:
    """One method per route of ``residlab serve``; ``timeout=None`` waits for the model."""

    def __init__(self, base_url: str = DEFAULT_URL, token: str | None = None, *,
                 timeout: float | None = None, transport: httpx.BaseTransport | None = None):
        token = token if token is not None else os.environ.get("RESIDLAB_TOKEN") or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ResidlabClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict | None = None,
              timeout: float | None | httpx.USE_CLIENT_DEFAULT = httpx.USE_CLIENT_DEFAULT) -> Any:
        try:
            answer = self._http.request(method, path, json=body, timeout=timeout)
        except httpx.HTTPError as error:
            raise UsageError(f"cannot reach the residlab server at {self.base_url}: "
                             f"{error}") from None
        if answer.status_code >= 400:
            raise ServerError(answer.status_code, _error_text(answer))
        return answer.json()

    @staticmethod
    def _body(**fields: Any) -> dict[str, Any]:
        return {key: value for key, value in fields.items() if value is not None}

    # --- model --------------------------------------------------------------------------------

    def health(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._call("GET", "/health", timeout=timeout)

    def model_info(self) -> dict[str, Any]:
        """``{variant, name, provenance}`` of the served model."""
        return self._call("GET", "/model/info")

    def load_model(self, *, variant: str | None = None, model: str | None = None,
                   dtype: str | None = None, device: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/model/load", self._body(
            variant=variant, model=model, dtype=dtype, device=device))

    def generate(self, prompt: str | list[str], **settings: Any) -> dict[str, Any]:
        """``settings``: max_new_tokens, temperature, top_p, generation_defaults,
        system_prompt, chat_template."""
        return self._call("POST", "/generate", {"prompt": prompt, **settings})

    def generate_with_steering(self, prompt: str | list[str], *,
                               steering: Sequence[dict] = (), vectors: Sequence[dict] = (),
                               **settings: Any) -> dict[str, Any]:
        """``steering``: ``[{trait, layer, coefficient}]``; ``vectors``: ``[{layer, vector,
        coefficient}]`` (coefficient x unit vector is added after the layer)."""
        return self._call("POST", "/generate/with-steering", {
            "prompt": prompt, "steering": list(steering), "vectors": list(vectors), **settings})

    def generate_with_capture(self, prompt: str | list[str], *, layers: str | None = None,
                              components: Sequence[str] | None = None, dtype: str = "fp32",
                              **settings: Any) -> dict[str, Any]:
        """Each result's ``activations`` decoded to ``{tensor name: (n, D) tensor}``."""
        from safetensors.torch import load

        body = self._body(prompt=prompt, layers=layers, dtype=dtype,
                          components=list(components) if components else None, **settings)
        answer = self._call("POST", "/generate/with-capture", body)
        for result in answer["results"]:
            result["activations"] = load(base64.b64decode(result["activations"]))
        return answer

    def generate_ids(self, prompts: Sequence[Sequence[int]], **settings: Any):
        """``residlab.generation.generate_ids`` run by the server -> ``[Generated]``."""
        from residlab.generation import Generated

        answer = self._call("POST", "/generate/ids", {
            "prompts": [list(map(int, row)) for row in prompts], **settings})
        return [Generated(out["token_ids"], out["finish_reason"]) for out in answer["outputs"]]

    def generation_settings(self, **settings: Any) -> dict[str, Any]:
        """``effective_generation_settings`` of the served model for these keywords."""
        return self._call("POST", "/generate/settings", settings)["generation_settings"]

    # --- tasks --------------------------------------------------------------------------------

    def capture(self, prompt_set: str, **options: Any) -> dict[str, Any]:
        """Start a capture task (options as ``residlab capture``); returns its record."""
        return self._call("POST", "/capture", {"prompt_set": prompt_set, **options})

    def extract_viz(self, prompt_set: str, **options: Any) -> dict[str, Any]:
        return self._call("POST", "/extract-viz", {"prompt_set": prompt_set, **options})

    def task(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/tasks/{task_id}")

    def wait(self, task_id: str, *, timeout: float = 600.0, poll: float = 0.2) -> dict[str, Any]:
        """Poll until the task is done or failed; returns its final record."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.task(task_id)
            if record["status"] in ("done", "error") or time.monotonic() > deadline:
                return record
            time.sleep(poll)

    # --- chat ---------------------------------------------------------------------------------

    def traits(self) -> Any:
        return self._call("GET", "/api/traits")

    def chat(self, messages: Sequence[dict], **request: Any) -> Iterator[dict[str, Any]]:
        """The events of ``POST /api/chat``, one dict per ``data:`` event, as they arrive."""
        body = {"messages": list(messages), **request}
        with self._http.stream("POST", "/api/chat", json=body) as answer:
            if answer.status_code >= 400:
                answer.read()
                raise ServerError(answer.status_code, _error_text(answer))
            yield from _events(answer.iter_lines())


def _error_text(answer: httpx.Response) -> str:
    try:
        return str(answer.json().get("error", answer.text))
    except (ValueError, AttributeError):
        return answer.text[:300]


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-sent events -> their JSON ``data`` (multi-line data joined, comments skipped)."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line.strip() and data:
            yield json.loads("\n".join(data))
            data = []
    if data:
        yield json.loads("\n".join(data))


# --- Mode A through a server -----------------------------------------------------------------

class RemoteModel:
    """What ``generate_responses`` needs of a loaded model, with the server generating."""

    def __init__(self, client: ResidlabClient, tokenizer, provenance: dict[str, Any]):
        self.client, self.tokenizer, self.provenance = client, tokenizer, provenance

    def generation_settings(self, **gen: Any) -> dict[str, Any]:
        return self.client.generation_settings(**gen)

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, interventions: Sequence = (),
                     **gen: Any):
        if interventions:
            raise UsageError("the model server path sends token ids only, not interventions; "
                             "steer with a local model (--no-server)")
        return self.client.generate_ids(prompts, **gen)


def _expected(spec) -> dict[str, Any]:
    """The identity a local load of the variant ``spec`` would record (no weights loaded)."""
    from residlab.models import _checkpoint_dtype, model_source, resolve_device, resolve_dtype
    from residlab.options import normalize_dtype

    path, identity = model_source(spec.model)
    device = resolve_device(spec.device)
    dtype = (_checkpoint_dtype(path) if normalize_dtype(spec.dtype) == "auto"
             else resolve_dtype(spec.dtype, device))
    return {**{key: identity[key] for key in IDENTITY_KEYS if identity.get(key) is not None},
            "lora": spec.lora, "dtype": str(dtype).removeprefix("torch."),
            "device": device.type, "path": path}


def _mismatch(expected: dict[str, Any], served: dict[str, Any]) -> str | None:
    for key in (*IDENTITY_KEYS, "lora", "dtype"):
        if expected.get(key) != served.get(key):
            return f"it serves {key}={served.get(key)!r}, this run needs {expected.get(key)!r}"
    served_device = str(served.get("device", "")).split(":")[0]
    if served_device != expected["device"]:
        return f"it runs on {served_device}, this run would load on {expected['device']}"
    return None


def find_server(experiment, variant: str | None, *, url: str | None = None,
                token: str | None = None, timeout: float = HEALTH_TIMEOUT) -> RemoteModel | None:
    """A :class:`RemoteModel` when a server at ``url`` (default ``RESIDLAB_SERVER``, else
    :data:`DEFAULT_URL`) serves the model ``variant`` of ``experiment`` would load; else
    ``None`` (why is logged)."""
    from residlab.models import load_tokenizer

    url = url or os.environ.get(SERVER_ENV) or DEFAULT_URL
    client = ResidlabClient(url, token)
    try:
        if not client.health(timeout=timeout).get("loaded"):
            raise UsageError("it has no model loaded")
        served = client.model_info()["provenance"]
        _, spec = experiment.variant(variant)
        expected = _expected(spec)
        reason = _mismatch(expected, served)
        if reason:
            raise UsageError(reason)
    except UsageError as error:
        log.info("not using the model server at %s (%s); loading the model here", url, error)
        client.close()
        return None
    log.info("generating through the model server at %s", url)
    tokenizer = load_tokenizer(expected["path"], trust_remote_code=spec.trust_remote_code)
    return RemoteModel(client, tokenizer, served)
