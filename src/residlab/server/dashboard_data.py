"""The dashboard's read-only data: every answer of ``GET /api/data/{endpoint}``, without FastAPI.

:class:`DashboardData` reads the experiment folders' known layouts (responses, projections,
calibration, trait vectors, lens/attention files, model diffs) and answers one endpoint at a
time as a JSON-ready dict; float arrays are little-endian float32, base64-encoded
(``*_b64``). The page (``static/dash_*.js``) and the static export both consume it, the export
through :meth:`DashboardData.export_keys` (every request the page can make).

Path safety: a request string is never joined into a path. Every name (experiment, variant,
prompt set, trait, prompt id, layer folder) is looked up in a listing of its folder made here
(hidden entries and symlinks left out), and every file is checked to resolve inside the root
before it is read. Parsed files are cached by ``(path, mtime_ns, size)``.

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

__all__ = ["ENDPOINTS", "DashboardData", "ModelUnavailable", "canonical_key"]

log = logging.getLogger(__name__)

ENDPOINTS = ("experiments", "experiment", "prompts", "response", "projections", "norms",
             "spans", "lens", "attention")
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

@dataclass(frozen=True)
class _Projection:
    """One projection file: values over the projected tokens (prompt part first)."""

    path: Path
    source: dict[str, Any]  # metadata.vector_source
    sha256: str | None  # of the vector's values
    centered: bool
    n_prompt: int | None  # projected prompt tokens (None: response-only)
    n_response: int
    proj: np.ndarray  # (n,) float64
    norms: np.ndarray  # (n,) float64
    dims: list[int] | None  # massive dims recorded
    values: np.ndarray | None  # (n, k) float64: the tokens' values on ``dims``

    @property
    def layer(self) -> int:
        return int(self.source["layer"])


def _float_list(value: Any, what: str) -> np.ndarray:
    if not isinstance(value, list):
        raise _Invalid(f"{what} is not a list")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _Invalid(f"{what} holds non-numbers") from None


def _parts(record: dict, key: str) -> tuple[np.ndarray | None, np.ndarray]:
    """``(prompt or None, response)`` of ``record[key]``."""
    block = record.get(key)
    if not isinstance(block, dict):
        raise _Invalid(f"no '{key}' object")
    prompt = block.get("prompt")
    prompt = None if prompt is None else _float_list(prompt, f"{key}.prompt")
    return prompt, _float_list(block.get("response"), f"{key}.response")


def _massive(record: dict, n_prompt: int | None, n: int) -> tuple[list[int] | None,
                                                                 np.ndarray | None]:
    block = record.get("massive_dims")
    if block is None:
        return None, None
    dims, values = block.get("dims"), block.get("values")
    if not isinstance(dims, list) or not all(isinstance(d, int) for d in dims) or not (
            isinstance(values, dict)):
        raise _Invalid("massive_dims needs 'dims' (whole numbers) and 'values'")
    rows = [] if n_prompt is None else [_float_list(values.get("prompt"), "massive prompt")]
    rows.append(_float_list(values.get("response"), "massive response"))
    rows = [r.reshape(0, len(dims)) if r.size == 0 else r for r in rows]
    stacked = np.concatenate(rows)  # (n, k)
    if stacked.shape != (n, len(dims)):
        raise _Invalid(f"massive_dims values have shape {stacked.shape}, expected "
                       f"({n}, {len(dims)})")
    return dims, stacked


def _parse_projection(path: Path, data: bytes) -> _Projection:
    record = orjson.loads(data)
    if not isinstance(record, dict):
        raise _Invalid("not a JSON object")
    meta = record.get("metadata")
    source = meta.get("vector_source") if isinstance(meta, dict) else None
    if not isinstance(source, dict) or not isinstance(source.get("layer"), int):
        raise _Invalid("no metadata.vector_source with a layer")
    prompt, response = _parts(record, "projections")
    norm_prompt, norm_response = _parts(record, "norms")
    if (prompt is None) != (norm_prompt is None) or (
            prompt is not None and prompt.shape != norm_prompt.shape) or (
            response.shape != norm_response.shape):
        raise _Invalid("projections and norms have different lengths")
    n_prompt = None if prompt is None else prompt.size
    proj = response if prompt is None else np.concatenate([prompt, response])
    norms = norm_response if prompt is None else np.concatenate([norm_prompt, norm_response])
    dims, values = _massive(record, n_prompt, proj.size)
    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    sha = (settings.get("vector") or {}).get("sha256") or source.get("sha256")
    return _Projection(path, source, sha, bool(meta.get("centered", False)), n_prompt,
                       response.size, proj, norms, dims, values)


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


class DashboardData:
    """Answers of the dashboard's JSON API over ``root`` (``experiments`` None: every
    experiment there). ``state`` (a :class:`~residlab.server.state.ServerState`) lets the lens
    and attention be computed on demand with the model it holds."""

    def __init__(self, root: str | Path, experiments: Sequence[str] | None = None,
                 state: Any | None = None):
        self.root = Path(root)
        self.top = self.root.resolve()
        self.only = None if experiments is None else set(experiments)
        self.state = state
        self.files = _LRU()
        self.listings = _LRU(max_bytes=1 << 62, max_entries=4096)
        self.spans_cache = _LRU(max_bytes=1 << 62, max_entries=16)
        from residlab.server import dashboard_views as views

        self.handlers: dict[str, Callable[[_Params], dict]] = {
            "experiments": self._experiments, "experiment": self._experiment,
            "prompts": self._prompts, "response": self._response,
            "projections": self._projections, "norms": self._norms,
            "spans": lambda p: views.spans(self, p), "lens": lambda p: views.lens(self, p),
            "attention": lambda p: views.attention(self, p)}

    def answer(self, endpoint: str, params: Mapping[str, str]) -> dict[str, Any]:
        """The JSON-ready answer of ``GET /api/data/{endpoint}?{params}`` (it may share
        objects with the file cache: serialise it, do not modify it)."""
        handler = self.handlers.get(endpoint)
        if handler is None:
            raise NotFound(f"unknown data endpoint {endpoint!r}; use one of "
                           f"{', '.join(ENDPOINTS)}")
        return handler(_Params(params))

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

    def _load(self, path: Path, parse: Callable[[Path, bytes], Any]) -> Any:
        """The parsed file, from the cache when its mtime and size are unchanged. Raises
        :class:`_Invalid` for a file that does not parse."""
        if not path.resolve().is_relative_to(self.top):
            raise NotFound(f"{path} is outside {self.root}")
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
        folder, source = self._responses_of(exp, variant, prompt_set)
        held = bool(self._ids(folder))
        if not held and not self._projected_sets(exp, variant, prompt_set):
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

    # --- experiments / experiment -------------------------------------------------------------

    def _experiments(self, p: _Params) -> dict[str, Any]:
        out = []
        for name in self._experiment_names():
            try:
                exp = self._exp(name)
            except UsageError as error:
                log.warning("experiment %s skipped: %s", name, error)
                continue
            out.append({"name": name, "variants": list(exp.config.model_variants),
                        "defaults": exp.config.defaults.model_dump()})
        return {"experiments": out}

    def _experiment(self, p: _Params) -> dict[str, Any]:
        exp = self._exp(p.text("exp"))
        variants = list(exp.config.model_variants)
        sets = {v: self._prompt_sets(exp, v) for v in variants}
        projections = {v: self._projection_index(exp, v) for v in variants}
        calibration = {v: self._inference(exp, v, "massive_activations", "calibration.json",
                                          is_dir=False) is not None for v in variants}
        return {
            "name": exp.name, "variants": variants,
            "defaults": exp.config.defaults.model_dump(),
            "traits": [{"trait": t, "category": t.split("/")[0], "name": t.split("/")[1]}
                       for t in self._all_traits(exp, variants)],
            "prompt_sets": {v: [self._set_entry(exp, v, s) for s in sets[v]] for v in variants},
            "projections": projections,
            "viz": {v: self._viz_index(exp, v) for v in variants},
            "diffs": self._diffs(exp, variants),
            "calibration": calibration,
            "hints": self._hints(exp, sets, projections, calibration),
        }

    def _set_entry(self, exp: Experiment, variant: str, prompt_set: str) -> dict[str, Any]:
        folder, source = self._responses_of(exp, variant, prompt_set)
        return {"name": prompt_set, "n_prompts": len(self._ids(folder)),
                "responses_from": source}

    def _all_traits(self, exp: Experiment, variants: Sequence[str]) -> list[str]:
        found = set(self._traits_under(self._child(self.root, exp.name, "extraction")))
        for variant in variants:
            found |= set(self._traits_under(self._inference(exp, variant, "projections")))
        return sorted(found)

    def _viz_index(self, exp: Experiment, variant: str) -> dict[str, dict[str, list[str]]]:
        base = self._child(self.root, exp.name, "analysis", "per_token", variant)
        out = {}
        for prompt_set in self._dirs(base):
            folder = self._child(base, prompt_set)
            lens = sorted(self._files(folder, "_logit_lens.json"), key=_id_key)
            attention = sorted(self._files(folder, "_attention.safetensors"), key=_id_key)
            if lens or attention:
                out[prompt_set] = {"lens": lens, "attention": attention}
        return out

    def _diffs(self, exp: Experiment, variants: Sequence[str]) -> list[dict[str, Any]]:
        base = self._child(self.root, exp.name, "model_diff")
        out = []
        for name in self._dirs(base):
            pair = next(((a, b) for a in variants for b in variants
                         if a != b and name == f"{a}_vs_{b}"), None)
            if pair is None:
                continue
            folder = self._child(base, name)
            sets = [s for s in self._dirs(folder) if s not in ("per_token_diff", "logprobs")
                    and self._child(folder, s, "results.json", is_dir=False) is not None]
            out.append({"variant_a": pair[0], "variant_b": pair[1], "prompt_sets": sets})
        return out

    def _hints(self, exp: Experiment, sets: dict[str, list[str]], projections: dict,
               calibration: dict[str, bool]) -> dict[str, str]:
        """What is missing, each with the command that makes it."""
        hints = {}
        app = exp.variant(None)[0]
        extraction = exp.variant(None, "extraction")[0]
        if not any(sets.values()):
            hints["responses"] = _cmd("responses", exp.name, prompt_set="PROMPT_SET",
                                      model_variant=app)
        if not self._traits_under(self._child(self.root, exp.name, "extraction")):
            hints["trait vectors"] = _cmd("extract", exp.name, traits="CATEGORY/NAME",
                                          model_variant=extraction)
        for variant, names in sets.items():
            for prompt_set in names:
                if prompt_set in projections[variant]:
                    continue
                captured = self._inference(exp, variant, "raw", "residual", prompt_set)
                kind = "project" if captured is not None else "capture"
                what = "projections" if kind == "project" else "captures"
                hints[f"{what} of {variant} on {prompt_set}"] = _cmd(
                    kind, exp.name, prompt_set=prompt_set, model_variant=variant)
        for variant, held in calibration.items():
            if not held and projections[variant]:
                hints[f"calibration of {variant}"] = _cmd("calibrate", exp.name,
                                                          model_variant=variant)
        viz = any(self._viz_index(exp, v) for v in sets)
        if not viz and sets.get(app):
            hints["logit lens and attention"] = _cmd(
                "extract-viz", exp.name, prompt_set=sets[app][0], model_variant=app) + \
                " --logit-lens --attention --layers 0,-1"
        return hints

    # --- projections: which folders -----------------------------------------------------------

    def _layer_folders(self, exp: Experiment, variant: str, trait: str,
                       prompt_set: str) -> tuple[dict[int, Path], int | None]:
        """``({layer: folder}, default layer)`` of a trait's projections of a set. The plain
        folder holds the default layer (the one its files record); ``{set}_L{n}`` folders hold
        the others, and win over the plain folder for their layer (they are one run)."""
        base = self._trait_dir(self._inference(exp, variant, "projections"), trait)
        folders: dict[int, Path] = {}
        default = None
        plain = self._child(base, prompt_set)
        ids = self._ids(plain)
        if ids:
            default = self._read_projection(self._child(plain, f"{ids[0]}.json", is_dir=False),
                                            exp, variant, prompt_set).layer
            folders[default] = plain
        for name in self._dirs(base):
            match = LAYER_FOLDER.fullmatch(name)
            if match and match.group(1) == prompt_set:
                folder = self._child(base, name)
                if self._ids(folder):
                    folders[int(match.group(2))] = folder
        if default is None and folders:
            default = min(folders)
        return dict(sorted(folders.items())), default

    def _projected_sets(self, exp: Experiment, variant: str, prompt_set: str) -> bool:
        base = self._inference(exp, variant, "projections")
        return any(self._layer_folders(exp, variant, t, prompt_set)[0]
                   for t in self._traits_under(base))

    def _projection_index(self, exp: Experiment, variant: str) -> dict[str, dict]:
        """``{set: {trait: {layers, default_layer}}}`` of one variant."""
        base = self._inference(exp, variant, "projections")
        out: dict[str, dict] = {}
        for trait in self._traits_under(base):
            names = self._dirs(self._trait_dir(base, trait))
            sets = {LAYER_FOLDER.fullmatch(n).group(1) if LAYER_FOLDER.fullmatch(n) else n
                    for n in names}
            for prompt_set in sorted(sets):
                folders, default = self._layer_folders(exp, variant, trait, prompt_set)
                if folders:
                    out.setdefault(prompt_set, {})[trait] = {"layers": list(folders),
                                                             "default_layer": default}
        return out

    def _read_projection(self, path: Path, exp: Experiment, variant: str,
                         prompt_set: str) -> _Projection:
        try:
            return self._load(path, _parse_projection)
        except _Invalid as error:
            command = _cmd("project", exp.name, prompt_set=prompt_set, model_variant=variant)
            raise UsageError(f"{path} is not a valid projection file ({error}); make it again "
                             f"with '{command}'") from None

    def _project_hint(self, exp: Experiment, variant: str, prompt_set: str,
                      trait: str | None = None) -> str:
        return _cmd("project", exp.name, prompt_set=prompt_set, model_variant=variant,
                    traits=trait)

    def _trait_files(self, where: _Where, trait: str, prompt_id: str) -> tuple[
            dict[int, _Projection], int | None]:
        """``({layer: projection of prompt_id}, default layer)``; NotFound when none."""
        exp, variant, prompt_set = where.exp, where.variant, where.prompt_set
        if self._trait_dir(self._inference(exp, variant, "projections"), trait) is None:
            raise NotFound(f"no projections of trait {trait!r} for {variant} of {exp.name}; "
                           f"run '{self._project_hint(exp, variant, prompt_set, trait)}'")
        folders, default = self._layer_folders(exp, variant, trait, prompt_set)
        files = {}
        for layer, folder in folders.items():
            path = self._child(folder, f"{prompt_id}.json", is_dir=False)
            if path is not None and not prompt_id.startswith("_"):
                files[layer] = self._read_projection(path, exp, variant, prompt_set)
        if not files:
            raise NotFound(f"no projections of {trait} for prompt {prompt_id!r} of "
                           f"{variant}/{prompt_set}; run "
                           f"'{self._project_hint(exp, variant, prompt_set, trait)}'")
        return files, default

    # --- cleaning --------------------------------------------------------------------------------

    def _top5(self, exp: Experiment, variant: str) -> set[int] | None:
        """Dims in the calibration's top 5 at >= 3 layers (``None``: no calibration)."""
        path = self._inference(exp, variant, "massive_activations", "calibration.json",
                               is_dir=False)
        if path is None:
            return None
        try:
            layers = self._load(path, _parse_json)["layers"]
            counts: dict[int, int] = {}
            for entry in layers.values():
                for dim in entry["dims"][:5]:
                    counts[int(dim)] = counts.get(int(dim), 0) + 1
        except (_Invalid, KeyError, TypeError, AttributeError, ValueError):
            raise UsageError(f"{path} is not a valid calibration file; make it again with "
                             f"'{_cmd('calibrate', exp.name, model_variant=variant)}'") from None
        return {dim for dim, n in counts.items() if n >= TOP5_MIN_LAYERS}

    def _clean_dims(self, where: _Where, file: _Projection, clean: str) -> list[int]:
        """Positions (into ``file.dims``) of the massive dims removed by ``clean``."""
        if clean == "none":
            return []
        if file.dims is None:
            raise NotFound(f"{file.path} records no massive dims, so clean={clean} is not "
                           "available; make a calibration with "
                           f"'{_cmd('calibrate', where.exp.name, model_variant=where.variant)}' "
                           f"and project again with "
                           f"'{self._project_hint(where.exp, where.variant, where.prompt_set)}'")
        if clean == "all":
            return list(range(len(file.dims)))
        top5 = self._top5(where.exp, where.variant)
        if top5 is None:
            raise NotFound(f"clean=top5 needs the calibration of {where.variant}; make it with "
                           f"'{_cmd('calibrate', where.exp.name, model_variant=where.variant)}'")
        return [i for i, dim in enumerate(file.dims) if dim in top5]

    def _unit(self, exp: Experiment, file: _Projection) -> np.ndarray | None:
        """The stored vector a projection used, as a unit float64 vector (``None``: gone)."""
        from residlab.outputs import tensor_sha256
        from residlab.traits.positions import position_slug
        from residlab.traits.vectors import load_vector

        source = file.source
        try:
            folder = self._trait_dir(self._child(self.root, exp.name, "extraction"),
                                     str(source["trait"]))
            path = self._child(folder, str(source["variant"]), "vectors",
                               position_slug(str(source["position"])), str(source["component"]),
                               str(source["method"]), f"layer{source['layer']}.safetensors",
                               is_dir=False)
        except KeyError:
            return None
        if path is None:
            return None
        stat = path.stat()
        key = ("vector", str(path), stat.st_mtime_ns, stat.st_size)
        found = self.files.get(key)
        if found is None:
            vector = load_vector(path)
            found = (tensor_sha256(vector.vector), vector.unit.double().numpy())
            self.files.put(key, found, stat.st_size)
        sha, unit = found
        if file.sha256 is not None and sha != file.sha256:
            raise UsageError(f"the vector {path} changed since {file.path} was made; project "
                             "again to clean its massive dims")
        return unit

    def _clean_available(self, where: _Where, files: Sequence[_Projection]) -> list[str]:
        out = ["none"]
        if all(f.dims is not None for f in files) and all(
                self._unit(where.exp, f) is not None for f in files):
            if self._top5(where.exp, where.variant) is not None:
                out.append("top5")
            out.append("all")
        return out

    @staticmethod
    def _cleaned(file: _Projection, chosen: list[int],
                 unit: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``(projection, norms)`` with the chosen massive dims' share removed."""
        if not chosen:
            return file.proj, file.norms
        values = file.values[:, chosen]  # (n, s)
        norms = np.sqrt(np.maximum(file.norms**2 - (values**2).sum(-1), 0))  # (n,)
        if unit is None:
            return file.proj, norms
        dims = [file.dims[i] for i in chosen]
        return file.proj - values @ unit[dims], norms  # (n,)

    # --- prompts / response ------------------------------------------------------------------

    def _prompts(self, p: _Params) -> dict[str, Any]:
        where = self._where(p)
        offset = p.integer("offset", 0, 0)
        limit = p.integer("limit", PAGE, 1, MAX_PAGE)
        ids = self._ids(where.responses)
        items = []
        for prompt_id in ids[offset:offset + limit]:
            record = self._record(where, prompt_id)
            items.append({"id": prompt_id, "prompt": str(record.get("prompt") or "")[
                :PREVIEW_CHARS], "note": record.get("prompt_note"),
                "tags": record.get("tags") or [], "n_tokens": len(record["token_ids"]),
                "prompt_end": record["prompt_end"]})
        return {"total": len(ids), "offset": offset, "limit": limit,
                "responses_from": where.responses_from, "items": items}

    def _response(self, p: _Params) -> dict[str, Any]:
        where = self._where(p)
        prompt_id = p.text("id")
        record = self._record(where, prompt_id)
        return {"id": prompt_id, "prompt": record.get("prompt"),
                "response": record.get("response"), "system_prompt": record.get("system_prompt"),
                "note": record.get("prompt_note"), "tags": record.get("tags") or [],
                "tokens": record["tokens"], "token_ids": record["token_ids"],
                "prompt_end": record["prompt_end"], "responses_from": where.responses_from}

    # --- projections / norms -------------------------------------------------------------------

    def _span_of(self, where: _Where, prompt_id: str, file: _Projection) -> tuple[int, int, int]:
        """``(n_tokens, prompt_end, start)`` of a projection file against its response."""
        record = self._record(where, prompt_id, required=False)
        if record is None:
            n_prompt = file.n_prompt or 0
            return n_prompt + file.n_response, n_prompt, 0
        n_tokens, end = len(record["token_ids"]), record["prompt_end"]
        start = end - (file.n_prompt or 0)
        if start < 0 or start + file.proj.size != n_tokens:
            raise UsageError(f"{file.path} holds {file.proj.size} values but the response has "
                             f"{n_tokens} tokens; project again with "
                             f"'{self._project_hint(where.exp, where.variant, where.prompt_set)}'")
        return n_tokens, end, start

    def _projections(self, p: _Params) -> dict[str, Any]:
        where = self._where(p)
        prompt_id, trait = p.text("id"), p.text("trait")
        clean = p.choice("clean", CLEAN, "none")
        files, default = self._trait_files(where, trait, prompt_id)
        available = self._clean_available(where, list(files.values()))
        if clean not in available:
            self._clean_dims(where, next(iter(files.values())), clean)  # says why
            raise NotFound(f"clean={clean} is not available for {trait} (the vector it was "
                           "projected on is gone); use one of " + ", ".join(available))
        n_tokens, prompt_end, start = self._span_of(where, prompt_id, files.get(
            default, next(iter(files.values()))))
        layers = []
        for layer, file in files.items():
            chosen = self._clean_dims(where, file, clean)
            proj, norms = self._cleaned(file, chosen, self._unit(where.exp, file) if chosen
                                        else None)
            response = norms[norms.size - file.n_response:]
            source = file.source
            layers.append({"layer": layer, "start": self._span_of(where, prompt_id, file)[2],
                           "method": source.get("method"), "position": source.get("position"),
                           "component": source.get("component"), "centered": file.centered,
                           "projection_b64": _b64(proj),
                           "mean_response_norm": float(response.mean()) if response.size
                           else None,
                           "massive_dims_removed": [file.dims[i] for i in chosen]})
        return {"trait": trait, "n_tokens": n_tokens, "prompt_end": prompt_end, "start": start,
                "default_layer": default, "clean": clean, "clean_available": available,
                "layers": layers}

    def _norm_file(self, where: _Where, prompt_id: str, layer: int) -> _Projection:
        """A projection file of ``prompt_id`` at ``layer`` (every trait's hold the same
        norms): the first trait's, preferring one with massive dims."""
        base = self._inference(where.exp, where.variant, "projections")
        found = []
        for trait in self._traits_under(base):
            folder = self._layer_folders(where.exp, where.variant, trait,
                                         where.prompt_set)[0].get(layer)
            path = self._child(folder, f"{prompt_id}.json", is_dir=False)
            if path is not None and not prompt_id.startswith("_"):
                file = self._read_projection(path, where.exp, where.variant, where.prompt_set)
                if file.dims is not None:
                    return file
                found.append(file)
        if not found:
            raise NotFound(f"no projections of prompt {prompt_id!r} of {where.variant}/"
                           f"{where.prompt_set} at layer {layer}; run "
                           f"'{self._project_hint(where.exp, where.variant, where.prompt_set)} "
                           f"--layer {layer}'")
        return found[0]

    def _norms(self, p: _Params) -> dict[str, Any]:
        where = self._where(p)
        prompt_id = p.text("id")
        layer = p.integer("layer")
        clean = p.choice("clean", CLEAN, "none")
        file = self._norm_file(where, prompt_id, layer)
        n_tokens, _, start = self._span_of(where, prompt_id, file)
        _, norms = self._cleaned(file, self._clean_dims(where, file, clean), None)
        response = norms[norms.size - file.n_response:]
        return {"layer": layer, "n_tokens": n_tokens, "start": start, "norms_b64": _b64(norms),
                "mean_response_norm": float(response.mean()) if response.size else None}

    # --- export --------------------------------------------------------------------------------

    def export_keys(self, experiment: str) -> Iterator[tuple[str, dict[str, str]]]:
        """Every ``(endpoint, params)`` the page can request for ``experiment``, as it sends
        them (files only: nothing is computed on demand)."""
        from residlab.server import dashboard_views

        return dashboard_views.export_keys(self, experiment)
