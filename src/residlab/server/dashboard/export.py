"""``residlab dashboard export``: the dashboard of one experiment as a folder that opens from
``file://``, for sharing results without a server.

The folder holds the page (``index.html``), its stylesheets and vendored libraries under
``static/``, the page's ES modules as one classic script (``static/dashboard.bundle.js``, see
:mod:`residlab.server.dashboard.bundle`: browsers do not load modules from ``file://``), and the
API's answers under ``data/``: ``data/index.js`` maps each canonical request key to a data
file, and each data file calls ``window.RESIDLAB_STATIC_PUT(key, payload)``. Scripts are the
one thing a ``file://`` page may load from its own folder (``fetch`` of a file is refused), so
the answers travel as scripts; the page loads one when a view asks for it.

The answers are exactly :meth:`DashboardData.answer` for every request of
:meth:`DashboardData.export_keys` (what the page can ask for this experiment). Those that are
missing (``NotFound``) are left out, and the page says "not in this export" for them. With a
noising folder, the Noising view's answers come along, and each run's ``viz.html`` is copied
to ``noising/{run}/viz.html``, where the static page links to it.

The folder is built beside ``out`` under a temporary name and renamed at the end, so ``out``
is never a half-written export.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from residlab.errors import NotFound, UsageError
from residlab.experiments import load_experiment
from residlab.server.dashboard import noising
from residlab.server.dashboard.bundle import bundle_modules
from residlab.server.dashboard.data import DashboardData
from residlab.server.dashboard.files import canonical_key

__all__ = ["CSP", "ExportResult", "export_dashboard", "static_index_html"]

STATIC_DIR = Path(__file__).parents[1] / "static"  # residlab/server/static
ENTRY = "dash_app.js"
BUNDLE = "dashboard.bundle.js"
# Scripts only from the export's own files (no inline script); 'self' covers the folder of a
# page opened from file:// in Chromium and the site when the folder is served over HTTP.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; "
       "img-src 'self' data:; connect-src 'none'; object-src 'none'; base-uri 'none'; "
       "form-action 'none'")
_REFERENCE = re.compile(r"(?P<q>[\"'])/static/(?P<name>(vendor/)?[\w.-]+)(?P=q)")
_MODULE_TAG = re.compile(r"<script\b[^>]*\btype=[\"']module[\"'][^>]*>\s*</script>", re.I)
_SCRIPT_TAG = re.compile(r"<script\b(?P<attrs>[^>]*)>(?P<body>.*?)</script>", re.I | re.S)
_CSP_META = re.compile(r"<meta\b[^>]*http-equiv=[\"']content-security-policy[\"'][^>]*>\s*",
                       re.I)
_HEAD = re.compile(r"<head\b[^>]*>(\s*<meta\s+charset=[^>]*>)?", re.I)
_MARKER = "data/index.js"  # what tells a previous export apart from any other folder


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: ``answers`` data files of ``requests`` asked (the rest were not
    found), ``bytes`` in all."""

    out: Path
    requests: int
    answers: int
    bytes: int

    def __str__(self) -> str:
        skipped = self.requests - self.answers
        left = f", {skipped} not found (left out)" if skipped else ""
        return (f"dashboard export: {self.out} ({self.answers} answers{left}, "
                f"{self.bytes / 1e6:.1f} MB); open {self.out / 'index.html'}")


def _script_json(value: Any) -> str:
    """``value`` as JSON made only of ASCII characters (non-ASCII as ``\\u`` escapes), so a
    data file reads the same whatever charset the browser assumes for it. orjson, like the
    server, writes NaN as null and accepts numpy values."""
    text = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    return re.sub(r"[^\x00-\x7f]+", lambda m: json.dumps(m.group(0))[1:-1], text)


# --- the page --------------------------------------------------------------------------------

def _page_files(html: str) -> list[str]:
    """The static files ``index.html`` refers to (``/static/NAME``), each checked to be a
    regular file of the page; the module entry is bundled, not copied."""
    names = list(dict.fromkeys(m["name"] for m in _REFERENCE.finditer(html)))
    for name in names:
        path = STATIC_DIR / name
        if path.is_symlink() or not path.is_file():
            raise NotFound(f"index.html refers to /static/{name}, which is not a file of "
                           f"{STATIC_DIR}; fix the page or run 'python scripts/fetch_frontend.py'")
    return [name for name in names if name != ENTRY]


def static_index_html(html: str) -> str:
    """The served ``index.html`` made to work from ``file://``: the module script replaced
    by the data index and the bundle (classic scripts), ``/static/NAME`` made relative, and a
    Content-Security-Policy that forbids inline script."""
    modules = _MODULE_TAG.findall(html)
    if len(modules) != 1 or f'src="/static/{ENTRY}"' not in modules[0]:
        raise UsageError(f"index.html must load exactly one <script type=\"module\" "
                         f"src=\"/static/{ENTRY}\"> (found {len(modules)} module scripts)")
    for tag in _SCRIPT_TAG.finditer(html):
        if tag["body"].strip() or "src=" not in tag["attrs"]:
            raise UsageError("index.html has an inline <script>; the page's code belongs in "
                             "its modules (the Content-Security-Policy forbids inline script)")
    # ``defer``: run after the document is parsed, in order, as the module did.
    html = _MODULE_TAG.sub(lambda _: f'<script defer src="{_MARKER}"></script>'
                           f'<script defer src="static/{BUNDLE}"></script>', html)
    html = _REFERENCE.sub(lambda m: f"{m['q']}static/{m['name']}{m['q']}", html)
    html = _CSP_META.sub("", html)
    head = _HEAD.search(html)
    if head is None:
        raise UsageError("index.html has no <head>; the export puts its security policy there")
    meta = f'\n<meta http-equiv="Content-Security-Policy" content="{CSP}">'
    return html[:head.end()] + meta + html[head.end():]


def _write_page(folder: Path) -> None:
    """``index.html``, the files it refers to (with the vendored libraries' licences) and the
    bundle."""
    source = STATIC_DIR / "index.html"
    if not source.is_file():
        raise NotFound(f"the dashboard page {source} is missing; reinstall residlab")
    html = source.read_text(encoding="utf-8")
    names = _page_files(html)
    (folder / "static" / "vendor").mkdir(parents=True)
    (folder / "index.html").write_text(static_index_html(html), encoding="utf-8")
    (folder / "static" / BUNDLE).write_text(bundle_modules(STATIC_DIR, ENTRY),
                                            encoding="utf-8")
    notices = [p.name for p in (STATIC_DIR / "vendor").glob("*") if p.is_file()
               and not p.is_symlink() and ("LICENSE" in p.name or p.name == "VENDORED.json")]
    for name in [*names, *(f"vendor/{n}" for n in notices)]:
        shutil.copyfile(STATIC_DIR / name, folder / "static" / name)


# --- the answers -----------------------------------------------------------------------------

def _requests(data: DashboardData, experiment: str) -> list[tuple[str, dict[str, str]]]:
    """Every request of the page for ``experiment``, once each: the experiment list and the
    experiment itself first (the page's first two requests), then ``export_keys``."""
    first = [("experiments", {}), ("experiment", {"exp": experiment})]
    unique: dict[str, tuple[str, dict[str, str]]] = {}
    for endpoint, params in [*first, *data.export_keys(experiment)]:
        unique.setdefault(canonical_key(endpoint, params), (endpoint, dict(params)))
    return list(unique.values())


def _write_answers(folder: Path, data: DashboardData,
                   requests: Iterable[tuple[str, dict[str, str]]], total: int) -> int:
    """One data file per answer found and ``data/index.js``; returns how many answers."""
    from residlab.progress import progress

    (folder / "data").mkdir()
    index: dict[str, str] = {}
    for endpoint, params in progress(requests, total=total, desc="dashboard export",
                                     unit="requests"):
        try:
            payload = data.answer(endpoint, params)
        except NotFound:  # the page shows "not in this export"
            continue
        key = canonical_key(endpoint, params)
        name = f"data/{len(index) + 1:05d}.js"
        (folder / name).write_text(f"window.RESIDLAB_STATIC_PUT({_script_json(key)}, "
                                   f"{_script_json(payload)});\n", encoding="ascii")
        index[key] = name
    (folder / _MARKER).write_text(f"window.RESIDLAB_STATIC = {_script_json({'index': index})};\n",
                                  encoding="ascii")
    return len(index)


# --- the folder ------------------------------------------------------------------------------

def _check_out(out: Path, force: bool) -> None:
    """Refuse what the export must not replace: a file, a folder with other content (unless
    ``force`` and it is a previous export: never someone's project folder)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"{out} exists and is not a folder; choose a new output folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise UsageError(f"{out} is not empty; choose a new output folder, or pass --force to "
                         "replace the export there")
    if not (out / _MARKER).is_file():
        raise UsageError(f"{out} is not a dashboard export (it has no {_MARKER}); --force "
                         "replaces only a previous export: choose a new output folder")


def _publish(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder to ``out``, replacing what ``out`` held only
    once the new export is in place."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "export")
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old / "export", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _write_noising_viz(folder: Path, data: DashboardData) -> None:
    """Each noising run's ``viz.html`` at ``noising/{run}/viz.html``: the run's ``viz_url``
    made relative, which is where the static page links (a run name is a listed folder name,
    never ``.``-prefixed, so it stays inside ``folder``)."""
    for run, path in noising.viz_files(data).items():
        target = folder / "noising" / run / "viz.html"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def export_dashboard(root: Path, experiment: str, out: Path, *, force: bool = False,
                     noising_dir: str | Path | None = None) -> ExportResult:
    """Write the static dashboard of ``experiment`` (under the experiments folder ``root``)
    to ``out``; ``force`` replaces a previous export there. ``noising_dir`` (the noising
    runner's ``output_dir``; None: no Noising runs) adds its runs' answers and viewers."""
    out = Path(out).absolute()
    _check_out(out, force)
    load_experiment(experiment, Path(root))  # unknown: an error naming the folder, no write
    data = DashboardData(Path(root), [experiment], state=None, noising_dir=noising_dir)
    data.answer("experiment", {"exp": experiment})
    requests = _requests(data, experiment)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_page(staging)
        answers = _write_answers(staging, data, requests, len(requests))
        _write_noising_viz(staging, data)
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        staging.chmod(0o777 & ~_umask())
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, len(requests), answers, size)


def _umask() -> int:
    """The process's umask (mkdtemp makes a private folder; the export is for sharing)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
