"""The dashboard's read-only data: every answer of ``GET /api/data/{endpoint}``, without FastAPI.

:class:`DashboardData` is the core: it lists the experiment folders' known layouts, caches
parsed files, reads the query parameters and dispatches each endpoint to its area's module,
which answers it as a JSON-ready dict (float arrays little-endian float32, base64, ``*_b64``):
part 1's Inference endpoints in :mod:`~residlab.server.dashboard_inference` (projection files
in :mod:`~residlab.server.dashboard_projections`), Top Spans / lens / attention in
:mod:`~residlab.server.dashboard_views`, and part 2's views in ``dashboard_extraction``,
``dashboard_steering``, ``dashboard_analysis`` and ``dashboard_noising``. The page
(``static/dash_*.js``) and the static export both consume the answers, the export through
:meth:`DashboardData.export_keys` (every request the page can make).

Path safety: a request string is never joined into a path. Every name (experiment, variant,
prompt set, trait, prompt id, layer folder, noising run) is looked up in a listing of its
folder made here (hidden entries and symlinks left out), and every file is checked to resolve
inside its root before it is read. Parsed files are cached by ``(path, mtime_ns, size)``.

Missing data answers :class:`~residlab.errors.NotFound` (404) naming the command that makes
it; a bad parameter :class:`~residlab.errors.UsageError` (400); a lens or attention that could
be computed but no model is loaded :class:`ModelUnavailable` (409).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from residlab.analysis.model_diff.per_token import _id_key
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment, load_experiment

__all__ = ["ENDPOINTS", "PART1_ENDPOINTS", "PART2_ENDPOINTS", "DashboardData", "ModelUnavailable",
           "canonical_key"]

log = logging.getLogger(__name__)

PART1_ENDPOINTS = ("experiments", "experiment", "prompts", "response", "projections", "norms",
                   "spans", "lens", "attention")
PART2_ENDPOINTS = ("overview", "extraction", "vector_lens", "contrastive", "steering",
                   "steering_responses", "calibration", "model_diff", "logprob_diff",
                   "diff_spans", "noising_runs", "noising_run")
ENDPOINTS = PART1_ENDPOINTS + PART2_ENDPOINTS
CLEAN = ("none", "top5", "all")
SPAN_MODES = ("clause", "window")
SPAN_WINDOWS = (4, 8, 16)
SPAN_TOP = 20
PAGE = 50  # prompts per page the dashboard asks for
MAX_PAGE = 500
PREVIEW_CHARS = 200
TOP5_MIN_LAYERS = 3  # "top5" cleaning: dims in the calibration's top 5 at this many layers
LENS_TOP_K = 5
ATTENTION_LIMIT = 256 * 2**20  # bytes of (n_layers, H, T, T) float16 computed on demand
CACHE_BYTES = 64 * 2**20  # source bytes of the parsed files kept
CACHE_ENTRIES = 1024
LAYER_FOLDER = re.compile(r"(.+)_L(-?\d+)")
INT = re.compile(r"-?\d{1,9}")


class ModelUnavailable(UsageError):
    """Something could be computed on demand, but the server holds no model (409)."""


def canonical_key(endpoint: str, params: Mapping[str, str]) -> str:
    """The static export's key of a request: ``[endpoint, [[k, v], ...]]`` sorted by key."""
    return json.dumps([endpoint, [list(item) for item in sorted(params.items())]],
                      separators=(",", ":"), ensure_ascii=False)


def _b64(values: np.ndarray) -> str:
    """Little-endian float32 bytes, base64."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


class _Invalid(Exception):
    """A file that does not have the expected shape (the reason)."""


# --- caches ------------------------------------------------------------------------------------

class _LRU:
    """A small thread-safe LRU of parsed files, bounded by source bytes and entries."""

    def __init__(self, max_bytes: int = CACHE_BYTES, max_entries: int = CACHE_ENTRIES):
        self.items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.max_bytes, self.max_entries, self.size = max_bytes, max_entries, 0
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self.lock:
            found = self.items.get(key)
            if found is None:
                return None
            self.items.move_to_end(key)
            return found[0]

    def put(self, key: Any, value: Any, weight: int) -> None:
        with self.lock:
            if key in self.items:
                self.size -= self.items.pop(key)[1]
            self.items[key] = (value, weight)
            self.size += weight
            while len(self.items) > 1 and (self.size > self.max_bytes
                                           or len(self.items) > self.max_entries):
                self.size -= self.items.popitem(last=False)[1][1]



# --- parsed files ------------------------------------------------------------------------------


def _parse_response(path: Path, data: bytes) -> dict[str, Any]:
    record = orjson.loads(data)
    if not isinstance(record, dict):
        raise _Invalid("not a JSON object")
    tokens, ids, end = record.get("tokens"), record.get("token_ids"), record.get("prompt_end")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise _Invalid("no 'token_ids' list")
    if not isinstance(tokens, list) or len(tokens) != len(ids):
        raise _Invalid("'tokens' missing or not as long as 'token_ids'")
    if not isinstance(end, int) or not 0 <= end <= len(ids):
        raise _Invalid("no 'prompt_end' within the tokens")
    return record


def _parse_json(path: Path, data: bytes) -> Any:
    return orjson.loads(data)


# --- request parameters ------------------------------------------------------------------------

class _Params:
    """The query parameters of one request, with one-line errors."""

    def __init__(self, params: Mapping[str, str]):
        self.params = params

    def text(self, name: str) -> str:
        value = self.params.get(name)
        if value is None or value == "":
            raise UsageError(f"missing query parameter {name!r}")
        return str(value)

    def integer(self, name: str, default: int | None = None, low: int | None = None,
                high: int | None = None) -> int:
        value = self.params.get(name)
        if value is None or value == "":
            if default is None:
                raise UsageError(f"missing query parameter {name!r} (a whole number)")
            return default
        if not INT.fullmatch(str(value)):
            raise UsageError(f"{name}={value!r}: give a whole number")
        number = int(value)
        if (low is not None and number < low) or (high is not None and number > high):
            raise UsageError(f"{name}={number} is out of range: use {low} to {high}")
        return number

    def choice(self, name: str, allowed: Sequence[str], default: str) -> str:
        value = self.params.get(name) or default
        if value not in allowed:
            raise UsageError(f"{name}={value!r}: use one of {', '.join(allowed)}")
        return value


@dataclass(frozen=True)
class _Where:
    """A validated (experiment, variant, prompt set) and its response folder."""

    exp: Experiment
    variant: str
    prompt_set: str
    responses: Path | None  # the folder of the response JSONs shown
    responses_from: str | None  # the variant they belong to, when another


def _cmd(kind: str, exp: str, **flags: str | None) -> str:
    parts = [f"residlab {kind} --experiment {exp}"]
    parts += [f"--{k.replace('_', '-')} {v}" for k, v in flags.items() if v is not None]
    return " ".join(parts)


Handler = Callable[["DashboardData", "_Params"], dict]


def _handlers() -> dict[str, Handler]:
    """The dispatch table: every area module's ``HANDLERS`` (imported here, after this module
    is complete, because they import its helpers)."""
    from residlab.server import (
        dashboard_analysis,
        dashboard_diff_spans,
        dashboard_extraction,
        dashboard_inference,
        dashboard_noising,
        dashboard_overview,
        dashboard_steering,
        dashboard_views,
    )

    table: dict[str, Handler] = {}
    for module in (dashboard_inference, dashboard_views, dashboard_overview,
                   dashboard_extraction, dashboard_steering, dashboard_analysis,
                   dashboard_diff_spans, dashboard_noising):
        table.update(module.HANDLERS)
    return table


class DashboardData:
    """Answers of the dashboard's JSON API over ``root`` (``experiments`` None: every
    experiment there). ``state`` (a :class:`~residlab.server.state.ServerState`) lets the lens
    and attention be computed on demand with the model it holds; ``noising_dir`` is the
    noising runner's ``output_dir`` whose runs the Noising view lists (None: none)."""

    def __init__(self, root: str | Path, experiments: Sequence[str] | None = None,
                 state: Any | None = None, *, noising_dir: str | Path | None = None):
        self.root = Path(root)
        self.top = self.root.resolve()
        self.only = None if experiments is None else set(experiments)
        self.state = state
        self.noising_dir = None if noising_dir is None else Path(noising_dir)
        self.files = _LRU()
        self.listings = _LRU(max_bytes=1 << 62, max_entries=4096)
        self.spans_cache = _LRU(max_bytes=1 << 62, max_entries=16)
        self.handlers = _handlers()

    def answer(self, endpoint: str, params: Mapping[str, str]) -> dict[str, Any]:
        """The JSON-ready answer of ``GET /api/data/{endpoint}?{params}`` (it may share
        objects with the file cache: serialise it, do not modify it)."""
        handler = self.handlers.get(endpoint)
        if handler is None:
            raise NotFound(f"unknown data endpoint {endpoint!r}; use one of "
                           f"{', '.join(ENDPOINTS)}")
        return handler(self, _Params(params))

    # --- listings ------------------------------------------------------------------------------

    def _listing(self, folder: Path | None) -> dict[str, tuple[Path, bool]]:
        """``{name: (path, is_dir)}`` of ``folder``'s visible, non-symlink entries."""
        if folder is None:
            return {}
        try:
            mtime = os.stat(folder).st_mtime_ns
        except OSError:
            return {}
        key = (str(folder), mtime)
        found = self.listings.get(key)
        if found is not None:
            return found
        entries = {}
        try:
            with os.scandir(folder) as scan:
                for entry in scan:
                    if entry.name.startswith(".") or entry.is_symlink():
                        continue
                    entries[entry.name] = (Path(entry.path), entry.is_dir(follow_symlinks=False))
        except OSError:
            return {}
        self.listings.put(key, entries, 1)
        return entries

    def _child(self, folder: Path | None, *names: str, is_dir: bool = True) -> Path | None:
        """``folder/names...`` when each name is in its parent's listing (the last a folder
        when ``is_dir``, else a regular file); ``None`` otherwise."""
        for i, name in enumerate(names):
            entry = self._listing(folder).get(name)
            want_dir = is_dir or i < len(names) - 1
            if entry is None or entry[1] != want_dir:
                return None
            folder = entry[0]
        if folder is not None and not (is_dir or folder.is_file()):
            return None
        return folder

    def _dirs(self, folder: Path | None) -> list[str]:
        return sorted(name for name, (_, is_dir) in self._listing(folder).items() if is_dir)

    def _files(self, folder: Path | None, suffix: str) -> list[str]:
        """Names of the regular files ending with ``suffix``, without it."""
        return [name[: -len(suffix)] for name, (_, is_dir) in self._listing(folder).items()
                if not is_dir and name.endswith(suffix) and len(name) > len(suffix)]

    def _trait_dir(self, base: Path | None, trait: str) -> Path | None:
        """``base/category/name`` for ``trait = "category/name"`` found in the listings."""
        category, sep, name = trait.partition("/")
        if not sep or "/" in name:
            return None
        return self._child(base, category, name)

    def _traits_under(self, base: Path | None) -> list[str]:
        return [f"{category}/{name}" for category in self._dirs(base)
                for name in self._dirs(self._child(base, category))]

    def _load(self, path: Path, parse: Callable[[Path, bytes], Any], *,
              top: Path | None = None) -> Any:
        """The parsed file, from the cache when its mtime and size are unchanged. Raises
        :class:`_Invalid` for a file that does not parse; NotFound for one outside ``top``
        (resolved; default the experiments root)."""
        top = self.top if top is None else top
        if not path.resolve().is_relative_to(top):
            raise NotFound(f"{path} is outside {top}")
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size, parse.__name__)
        found = self.files.get(key)
        if found is not None:
            return found
        try:
            value = parse(path, path.read_bytes())
        except orjson.JSONDecodeError as error:
            raise _Invalid(f"not valid JSON: {error}") from None
        self.files.put(key, value, stat.st_size)
        return value

    # --- experiments, variants, prompt sets --------------------------------------------------

    def _experiment_names(self) -> list[str]:
        names = [name for name in self._dirs(self.root)
                 if self._child(self.root, name, "config.yaml", is_dir=False) is not None]
        return [name for name in names if self.only is None or name in self.only]

    def _exp(self, name: str) -> Experiment:
        if name not in self._experiment_names():
            known = ", ".join(self._experiment_names()) or "none"
            raise NotFound(f"no experiment {name!r} here (experiments: {known})")
        config = self._child(self.root, name, "config.yaml", is_dir=False)
        stat = config.stat()
        key = ("experiment", str(config), stat.st_mtime_ns, stat.st_size)
        found = self.files.get(key)
        if found is None:
            found = load_experiment(name, self.root)
            self.files.put(key, found, stat.st_size)
        return found

    def _variant(self, exp: Experiment, name: str) -> str:
        if name not in exp.config.model_variants:
            raise NotFound(f"experiment {exp.name!r} has no variant {name!r} (variants: "
                           f"{', '.join(exp.config.model_variants)})")
        return name

    def _inference(self, exp: Experiment, variant: str, *names: str,
                   is_dir: bool = True) -> Path | None:
        return self._child(self.root, exp.name, "inference", variant, *names, is_dir=is_dir)

    def _provenance_source(self, exp: Experiment, variant: str, prompt_set: str) -> str | None:
        """The variant whose responses a capture of ``variant`` replayed (``--responses-from``)."""
        path = self._inference(exp, variant, "raw", "residual", prompt_set, "_provenance.json",
                               is_dir=False)
        if path is None:
            return None
        try:
            record = self._load(path, _parse_json)
        except _Invalid:
            return None
        last = record.get("last_run") if isinstance(record, dict) else None
        source = (last or {}).get("responses_from") if isinstance(last, dict) else None
        known = source in exp.config.model_variants and source != variant
        return source if known else None

    def _responses_of(self, exp: Experiment, variant: str, prompt_set: str) -> tuple[
            Path | None, str | None]:
        """``(folder of the responses shown, the variant they come from when another)``."""
        source = self._provenance_source(exp, variant, prompt_set)
        if source is not None:
            folder = self._inference(exp, source, "responses", prompt_set)
            if folder is not None and self._ids(folder):
                return folder, source
        return self._inference(exp, variant, "responses", prompt_set), None

    def _ids(self, folder: Path | None) -> list[str]:
        """Prompt ids of a folder of ``{id}.json`` files, in natural order."""
        listing = self._listing(folder)
        key = ("ids", id(listing))
        found = self.listings.get(key)
        if found is None or found[0] is not listing:
            ids = sorted((i for i in self._files(folder, ".json") if not i.startswith("_")),
                         key=_id_key)
            found = (listing, ids)
            self.listings.put(key, found, 1)
        return found[1]

    def _prompt_sets(self, exp: Experiment, variant: str) -> list[str]:
        """Sets with responses shown for ``variant`` (its own or replayed ones)."""
        names = set(self._dirs(self._inference(exp, variant, "responses")))
        names |= set(self._dirs(self._inference(exp, variant, "raw", "residual")))
        return sorted(name for name in names
                      if self._ids(self._responses_of(exp, variant, name)[0]))

    def _where(self, p: _Params) -> _Where:
        exp = self._exp(p.text("exp"))
        return self.locate(exp, self._variant(exp, p.text("variant")), p.text("set"))

    def locate(self, exp: Experiment, variant: str, prompt_set: str) -> _Where:
        """A known prompt set of ``variant`` (responses, replayed responses or projections)."""
        from residlab.server import dashboard_projections

        folder, source = self._responses_of(exp, variant, prompt_set)
        held = bool(self._ids(folder))
        if not held and not dashboard_projections.projected_sets(self, exp, variant, prompt_set):
            known = ", ".join(self._prompt_sets(exp, variant)) or "none"
            command = _cmd("responses", exp.name, prompt_set=prompt_set, model_variant=variant)
            raise NotFound(f"variant {variant} of {exp.name} has no prompt set {prompt_set!r} "
                           f"(sets: {known}); make it with '{command}'")
        return _Where(exp, variant, prompt_set, folder if held else None, source)

    def _record(self, where: _Where, prompt_id: str, required: bool = True) -> dict | None:
        """The response JSON of ``prompt_id`` (``None`` when absent and not ``required``)."""
        path = self._child(where.responses, f"{prompt_id}.json", is_dir=False)
        command = _cmd("responses", where.exp.name, prompt_set=where.prompt_set,
                       model_variant=where.responses_from or where.variant)
        if path is None or prompt_id.startswith("_"):
            if not required:
                return None
            raise NotFound(f"no prompt {prompt_id!r} in {where.variant}/{where.prompt_set} of "
                           f"{where.exp.name}; make it with '{command}'")
        try:
            return self._load(path, _parse_response)
        except _Invalid as error:
            raise UsageError(f"{path} is not a valid response file ({error}); make it again "
                             f"with '{command}'") from None

    # --- export --------------------------------------------------------------------------------

    def export_keys(self, experiment: str) -> Iterator[tuple[str, dict[str, str]]]:
        """Every ``(endpoint, params)`` the page can request for ``experiment``, as it sends
        them (files only: nothing is computed on demand): part 1's, then each part-2 area's."""
        from residlab.server import (
            dashboard_analysis,
            dashboard_diff_spans,
            dashboard_extraction,
            dashboard_keys,
            dashboard_noising,
            dashboard_overview,
            dashboard_steering,
        )

        yield from dashboard_keys.export_keys(self, experiment)
        for module in (dashboard_overview, dashboard_extraction, dashboard_steering,
                       dashboard_analysis, dashboard_diff_spans, dashboard_noising):
            yield from module.export_keys(self, experiment)
