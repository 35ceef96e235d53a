"""Output folders that never silently mix settings.

Every file a stage writes records the settings that made it. Before writing into a folder,
the stage compares what is there with what it would write: files of the same settings are kept
(with ``--skip-existing``), stale or mismatched ones are made again (and the log says why), and
a folder that would end up holding files of other settings is refused in one line naming the
flag that keeps both (``--output-suffix``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

import torch

from residlab.errors import UsageError

__all__ = ["UNRECORDED", "Existing", "differing_setting", "keep_or_refuse", "tensor_sha256"]

log = logging.getLogger(__name__)
UNRECORDED = "<unrecorded>"


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's float32 values: tells whether two vectors are the same."""
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def differing_setting(theirs: dict[str, Any], ours: dict[str, Any]) -> tuple[str, str] | None:
    """The first setting that differs, described as ``(theirs, ours)``; ``None`` if none.
    For dict-valued settings the first differing entry is named (``vector.layer 3``)."""
    for key, value in ours.items():
        other = theirs.get(key, UNRECORDED)
        if other == value:
            continue
        if isinstance(other, dict) and isinstance(value, dict):
            sub = next(k for k in sorted(set(other) | set(value))
                       if other.get(k, UNRECORDED) != value.get(k, UNRECORDED))
            key, other, value = f"{key}.{sub}", other.get(sub, UNRECORDED), value.get(sub,
                                                                                     UNRECORDED)
        theirs_text, ours_text = _describe(key, other), _describe(key, value)
        if theirs_text == ours_text:  # the short forms hide the difference: show it all
            theirs_text, ours_text = _describe(key, other, 400), _describe(key, value, 400)
        return theirs_text, ours_text
    return None


def _describe(key: str, value: Any, width: int = 80) -> str:
    if isinstance(value, str) and value == UNRECORDED:
        return f"no {key} recorded"
    if key == "steering" and isinstance(value, list) and width <= 80:
        specs = [f"{s.get('trait')}:L{s.get('layer')}:c{_number(s.get('coefficient'))} "
                 f"(vector {str(s.get('vector_sha256'))[:8]})" for s in value]
        return f"steering {', '.join(specs)}" if specs else "no steering"
    text = json.dumps(value, sort_keys=True)
    return f"{key} {text if len(text) <= width else text[:width - 3] + '...'}"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


class Existing(NamedTuple):
    """A file already in an output folder: ``same`` (keepable), ``stale`` (made again when
    resuming) or ``settings`` (made with other settings: ``why`` is theirs, ``ours`` this
    run's)."""

    kind: str
    why: str = ""
    ours: str = ""


def keep_or_refuse(folder: Path, found: dict[str, Existing], run: Collection[str],
                   skip_existing: bool, what: str) -> set[str]:
    """The names (file stems) in ``found`` to keep; the other names in ``run`` are made (again).

    Refuses, in one line naming ``--output-suffix``, when ``folder`` would end up holding
    ``what`` of other settings: such files exist and are not all redone by this run (always
    without ``skip_existing``; with it, when some are not among ``run``). Files made again
    are logged with the reason."""
    foreign = [name for name, f in found.items() if f.kind == "settings"]
    left = [name for name in foreign if name not in run]
    if left or (foreign and not skip_existing):
        name = (left or foreign)[0]
        hint = ("pass --output-suffix NAME to keep both, or --skip-existing to make them "
                "again with this run's settings") if not left else (
            "this run would not redo them; pass --output-suffix NAME to keep both")
        raise UsageError(f"{folder} holds {what} made with {found[name].why} ({name}.json); "
                         f"this run uses {found[name].ours}: {hint}")
    if not skip_existing:
        return set()
    redo = [name for name in run if name in found and found[name].kind != "same"]
    for name in redo:
        f = found[name]
        why = f"made with {f.why}, this run uses {f.ours}" if f.kind == "settings" else f.why
        log.info("making %s again: %s", folder / f"{name}.json", why)
    if redo:
        log.warning("making %d existing file(s) in %s again because they differ from this "
                    "run (see above)", len(redo), folder)
    return {name for name in run if name in found and found[name].kind == "same"}
