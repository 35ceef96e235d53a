"""The dashboard's file layer: the names of a request resolved to files through listings,
and those files parsed and cached. Every area module (:mod:`.inference`, :mod:`.deepdive`,
:mod:`.extraction`, ...) reads the experiment folders through :class:`DashboardFiles`;
:class:`~residlab.server.dashboard.data.DashboardData` adds the dispatch of each endpoint to
its area. This module imports no other module of the package.

Answers are JSON-ready dicts (float arrays little-endian float32, base64, ``*_b64``, see
:func:`b64`); the static export keys them with :func:`canonical_key`.

Path safety: a request string is never joined into a path. Every name (experiment, variant,
prompt set, trait, prompt id, layer folder, noising run) is looked up in a listing of its
folder made here (hidden entries and symlinks left out), and every file is checked to resolve
inside its root before it is read. Parsed files are cached by ``(path, mtime_ns, size)``.

Missing data answers :class:`~residlab.errors.NotFound` (404) naming the command that makes
it (:func:`cmd`); a bad parameter :class:`~residlab.errors.UsageError` (400); a lens or
attention that could be computed but no model is loaded :class:`ModelUnavailable` (409).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from residlab.analysis.model_diff.per_token import id_sort_key
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment, load_experiment

__all__ = ["LRU", "DashboardFiles", "Invalid", "ModelUnavailable", "Params", "Where", "b64",
           "canonical_key", "cmd", "parse_json", "parse_response"]

log = logging.getLogger(__name__)

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


def b64(values: np.ndarray) -> str:
    """Little-endian float32 bytes, base64."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


class Invalid(Exception):
    """A file that does not have the expected shape (the reason)."""


# --- caches ------------------------------------------------------------------------------------

class LRU:
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


def parse_response(path: Path, data: bytes) -> dict[str, Any]:
    record = orjson.loads(data)
    if not isinstance(record, dict):
        raise Invalid("not a JSON object")
    tokens, ids, end = record.get("tokens"), record.get("token_ids"), record.get("prompt_end")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise Invalid("no 'token_ids' list")
    if not isinstance(tokens, list) or len(tokens) != len(ids):
        raise Invalid("'tokens' missing or not as long as 'token_ids'")
    if not isinstance(end, int) or not 0 <= end <= len(ids):
        raise Invalid("no 'prompt_end' within the tokens")
    return record


def parse_json(path: Path, data: bytes) -> Any:
    return orjson.loads(data)


# --- request parameters ------------------------------------------------------------------------

class Params:
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
class Where:
    """A validated (experiment, variant, prompt set) and its response folder."""

    exp: Experiment
    variant: str
    prompt_set: str
    responses: Path | None  # the folder of the response JSONs shown
    responses_from: str | None  # the variant they belong to, when another


def cmd(kind: str, exp: str, **flags: str | None) -> str:
    parts = [f"residlab {kind} --experiment {exp}"]
    parts += [f"--{k.replace('_', '-')} {v}" for k, v in flags.items() if v is not None]
    return " ".join(parts)


class DashboardFiles:
    """The experiment folders under ``root`` (``experiments`` None: every experiment there),
    read through listings and a cache of parsed files. ``state`` (a
    :class:`~residlab.server.state.ServerState`) lets the lens and attention be computed on
    demand with the model it holds; ``noising_dir`` is the noising runner's ``output_dir``
    whose runs the Noising view lists (None: none)."""

    def __init__(self, root: str | Path, experiments: Sequence[str] | None = None,
                 state: Any | None = None, *, noising_dir: str | Path | None = None):
        self.root = Path(root)
        self.top = self.root.resolve()
        self.only = None if experiments is None else set(experiments)
        self.state = state
        self.noising_dir = None if noising_dir is None else Path(noising_dir)
        self.file_cache = LRU()
        self.listings = LRU(max_bytes=1 << 62, max_entries=4096)
        self.spans_cache = LRU(max_bytes=1 << 62, max_entries=16)

    # --- listings ------------------------------------------------------------------------------

    def listing(self, folder: Path | None) -> dict[str, tuple[Path, bool]]:
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

    def child(self, folder: Path | None, *names: str, is_dir: bool = True) -> Path | None:
        """``folder/names...`` when each name is in its parent's listing (the last a folder
        when ``is_dir``, else a regular file); ``None`` otherwise."""
        for i, name in enumerate(names):
            entry = self.listing(folder).get(name)
            want_dir = is_dir or i < len(names) - 1
            if entry is None or entry[1] != want_dir:
                return None
            folder = entry[0]
        if folder is not None and not (is_dir or folder.is_file()):
            return None
        return folder

    def dirs(self, folder: Path | None) -> list[str]:
        return sorted(name for name, (_, is_dir) in self.listing(folder).items() if is_dir)

    def file_names(self, folder: Path | None, suffix: str) -> list[str]:
        """Names of the regular files ending with ``suffix``, without it."""
        return [name[: -len(suffix)] for name, (_, is_dir) in self.listing(folder).items()
                if not is_dir and name.endswith(suffix) and len(name) > len(suffix)]

    def trait_dir(self, base: Path | None, trait: str) -> Path | None:
        """``base/category/name`` for ``trait = "category/name"`` found in the listings."""
        category, sep, name = trait.partition("/")
        if not sep or "/" in name:
            return None
        return self.child(base, category, name)

    def traits_under(self, base: Path | None) -> list[str]:
        return [f"{category}/{name}" for category in self.dirs(base)
                for name in self.dirs(self.child(base, category))]

    def load(self, path: Path, parse: Callable[[Path, bytes], Any], *,
             top: Path | None = None) -> Any:
        """The parsed file, from the cache when its mtime and size are unchanged. Raises
        :class:`Invalid` for a file that does not parse; NotFound for one outside ``top``
        (resolved; default the experiments root)."""
        top = self.top if top is None else top
        if not path.resolve().is_relative_to(top):
            raise NotFound(f"{path} is outside {top}")
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size, parse.__name__)
        found = self.file_cache.get(key)
        if found is not None:
            return found
        try:
            value = parse(path, path.read_bytes())
        except orjson.JSONDecodeError as error:
            raise Invalid(f"not valid JSON: {error}") from None
        self.file_cache.put(key, value, stat.st_size)
        return value

    # --- experiments, variants, prompt sets --------------------------------------------------

    def experiment_names(self) -> list[str]:
        names = [name for name in self.dirs(self.root)
                 if self.child(self.root, name, "config.yaml", is_dir=False) is not None]
        return [name for name in names if self.only is None or name in self.only]

    def experiment(self, name: str) -> Experiment:
        if name not in self.experiment_names():
            known = ", ".join(self.experiment_names()) or "none"
            raise NotFound(f"no experiment {name!r} here (experiments: {known})")
        config = self.child(self.root, name, "config.yaml", is_dir=False)
        stat = config.stat()
        key = ("experiment", str(config), stat.st_mtime_ns, stat.st_size)
        found = self.file_cache.get(key)
        if found is None:
            found = load_experiment(name, self.root)
            self.file_cache.put(key, found, stat.st_size)
        return found

    def variant(self, exp: Experiment, name: str) -> str:
        if name not in exp.config.model_variants:
            raise NotFound(f"experiment {exp.name!r} has no variant {name!r} (variants: "
                           f"{', '.join(exp.config.model_variants)})")
        return name

    def inference(self, exp: Experiment, variant: str, *names: str,
                  is_dir: bool = True) -> Path | None:
        return self.child(self.root, exp.name, "inference", variant, *names, is_dir=is_dir)

    def calibration_file(self, exp: Experiment, variant: str) -> Path | None:
        """``variant``'s ``massive_activations/calibration.json`` (None: not calibrated)."""
        return self.inference(exp, variant, "massive_activations", "calibration.json",
                              is_dir=False)

    def _provenance_source(self, exp: Experiment, variant: str, prompt_set: str) -> str | None:
        """The variant whose responses a capture of ``variant`` replayed (``--responses-from``)."""
        path = self.inference(exp, variant, "raw", "residual", prompt_set, "_provenance.json",
                              is_dir=False)
        if path is None:
            return None
        try:
            record = self.load(path, parse_json)
        except Invalid:
            return None
        last = record.get("last_run") if isinstance(record, dict) else None
        source = (last or {}).get("responses_from") if isinstance(last, dict) else None
        known = source in exp.config.model_variants and source != variant
        return source if known else None

    def responses_of(self, exp: Experiment, variant: str, prompt_set: str) -> tuple[
            Path | None, str | None]:
        """``(folder of the responses shown, the variant they come from when another)``."""
        source = self._provenance_source(exp, variant, prompt_set)
        if source is not None:
            folder = self.inference(exp, source, "responses", prompt_set)
            if folder is not None and self.ids(folder):
                return folder, source
        return self.inference(exp, variant, "responses", prompt_set), None

    def ids(self, folder: Path | None) -> list[str]:
        """Prompt ids of a folder of ``{id}.json`` files, in natural order."""
        listing = self.listing(folder)
        key = ("ids", id(listing))
        found = self.listings.get(key)
        if found is None or found[0] is not listing:
            ids = sorted((i for i in self.file_names(folder, ".json") if not i.startswith("_")),
                         key=id_sort_key)
            found = (listing, ids)
            self.listings.put(key, found, 1)
        return found[1]

    def prompt_sets(self, exp: Experiment, variant: str) -> list[str]:
        """Sets with responses shown for ``variant`` (its own or replayed ones)."""
        names = set(self.dirs(self.inference(exp, variant, "responses")))
        names |= set(self.dirs(self.inference(exp, variant, "raw", "residual")))
        return sorted(name for name in names
                      if self.ids(self.responses_of(exp, variant, name)[0]))

    def projected(self, exp: Experiment, variant: str, prompt_set: str) -> bool:
        """Whether any trait holds projections of ``prompt_set`` for ``variant`` (its plain
        folder or a ``{set}_L{n}`` one, with files), from the listings alone."""
        base = self.inference(exp, variant, "projections")
        for trait in self.traits_under(base):
            folder = self.trait_dir(base, trait)
            for name in self.dirs(folder):
                match = LAYER_FOLDER.fullmatch(name)
                if (name == prompt_set or (match and match.group(1) == prompt_set)) and (
                        self.ids(self.child(folder, name))):
                    return True
        return False

    def where(self, p: Params) -> Where:
        exp = self.experiment(p.text("exp"))
        return self.locate(exp, self.variant(exp, p.text("variant")), p.text("set"))

    def locate(self, exp: Experiment, variant: str, prompt_set: str) -> Where:
        """A known prompt set of ``variant`` (responses, replayed responses or projections)."""
        folder, source = self.responses_of(exp, variant, prompt_set)
        held = bool(self.ids(folder))
        if not held and not self.projected(exp, variant, prompt_set):
            known = ", ".join(self.prompt_sets(exp, variant)) or "none"
            command = cmd("responses", exp.name, prompt_set=prompt_set, model_variant=variant)
            raise NotFound(f"variant {variant} of {exp.name} has no prompt set {prompt_set!r} "
                           f"(sets: {known}); make it with '{command}'")
        return Where(exp, variant, prompt_set, folder if held else None, source)

    def record(self, where: Where, prompt_id: str, required: bool = True) -> dict | None:
        """The response JSON of ``prompt_id`` (``None`` when absent and not ``required``)."""
        path = self.child(where.responses, f"{prompt_id}.json", is_dir=False)
        command = cmd("responses", where.exp.name, prompt_set=where.prompt_set,
                      model_variant=where.responses_from or where.variant)
        if path is None or prompt_id.startswith("_"):
            if not required:
                return None
            raise NotFound(f"no prompt {prompt_id!r} in {where.variant}/{where.prompt_set} of "
                           f"{where.exp.name}; make it with '{command}'")
        try:
            return self.load(path, parse_response)
        except Invalid as error:
            raise UsageError(f"{path} is not a valid response file ({error}); make it again "
                             f"with '{command}'") from None
