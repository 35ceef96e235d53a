"""What a capture folder already holds: which prompts must be captured (again) for what is
asked, and the folder's ``_provenance.json`` (only what every file holds).

``capture --skip-existing`` keeps a file only when its header says it holds exactly what is
asked over the response JSON's token ids, all finite; :func:`to_capture` says why any other
file is captured again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from residlab.inference.raw import Contents, contents, tensor_name, token_hash
from residlab.models import library_versions
from residlab.store import write_json

__all__ = ["Asked", "to_capture", "write_provenance"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asked:
    """What a capture run writes into every file."""

    layers: tuple[int, ...]
    components: tuple[str, ...]
    response_only: bool
    dtype: str
    n_layers: int
    family: str

    def contents(self) -> Contents:
        parts = ("response",) if self.response_only else ("prompt", "response")
        names = frozenset(tensor_name(part, layer, component) for part in parts
                          for layer in self.layers for component in self.components)
        return Contents(names, frozenset({self.dtype}), None, None, self.n_layers, self.family)


def _short(values: Sequence) -> str:
    values = list(values)
    return str(values) if len(values) <= 8 else f"[{values[0]}..{values[-1]}] ({len(values)})"


def _difference(held: Contents | None, record: dict, asked: Asked) -> str | None:
    """Why an existing file cannot be kept; ``None`` when it holds exactly what is asked."""
    if held is None:
        return "unreadable or truncated"
    want = asked.contents()
    if held.token_sha is None:
        return "it does not record which token ids it was captured over (older capture)"
    if held.token_sha != token_hash(record["token_ids"]):
        return "it was captured over other token ids than the response JSON now holds"
    if held.prompt_end != record["prompt_end"]:
        return f"its prompt ends at token {held.prompt_end}, not {record['prompt_end']}"
    if held.response_only != asked.response_only:
        return f"response_only is {held.response_only}, asked {asked.response_only}"
    if held.layers != want.layers:
        return f"it holds layers {_short(held.layers)}, asked {_short(want.layers)}"
    if held.components != want.components:
        return f"it holds {held.components}, asked {want.components}"
    if held.names != want.names:
        return "some of the asked (layer, component) tensors are missing"
    if held.dtypes != want.dtypes:
        return f"it is stored as {sorted(held.dtypes)}, asked {asked.dtype}"
    return None


def to_capture(records: list[dict], out_dir: Path, asked: Asked) -> list[dict]:
    """The records whose file is missing or differs from what is asked."""
    todo, redo = [], []
    for record in records:
        path = out_dir / f"{record['id']}.safetensors"
        why = _difference(contents(path), record, asked) if path.exists() else "new"
        why = why or _nonfinite_file(path)
        if why is None:
            continue
        todo.append(record)
        if why != "new":
            log.info("capturing %s again: %s", path, why)
            redo.append(f"{path.name}: {why}")
    if redo:
        log.warning("capturing %d existing file(s) again because they differ from what is "
                    "asked, e.g. %s", len(redo), "; ".join(redo[:3]))
    return todo


def _nonfinite_file(path: Path) -> str | None:
    """Why a complete file cannot be kept for its values: files written since captures are
    checked say ``all_finite`` in their metadata; older ones are read and checked."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("residlab", "{}"))
            if meta.get("all_finite") is True:
                return None
            for name in handle.keys():  # noqa: SIM118
                if not torch.isfinite(handle.get_tensor(name)).all():
                    return f"{name} holds NaN or inf"
    except Exception as error:  # safetensors raises its own error types
        return f"unreadable ({' '.join(str(error).split())[:80]})"
    return None


def _held_by_all(held: list[Contents]) -> dict:
    """Layers and components that every file holds (each listed layer has each listed
    component), whether any file lacks prompt tokens, and the storage dtype."""
    if not held:
        return {"layers": [], "components": [], "response_only": None, "dtype": None}
    common = frozenset.intersection(*(h.pairs for h in held))
    components = sorted({component for _, component in common})
    layers = sorted({layer for layer, _ in common
                     if all((layer, component) in common for component in components)})
    dtypes = sorted(frozenset().union(*(h.dtypes for h in held)))
    return {"layers": layers, "components": components,
            "response_only": any(h.response_only for h in held),
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes}


def write_provenance(out_dir: Path, extra: dict, model: dict,
                      planned: Asked | None = None) -> None:
    """``_provenance.json`` claims only what every file of the folder holds (read from their
    headers; while a run is under way, also what it is about to write). What the latest run
    asked is kept apart, under ``last_run``; each file's own metadata stays authoritative."""
    held = [c for c in map(contents, sorted(out_dir.glob("*.safetensors"))) if c is not None]
    if planned is not None:
        held.append(planned.contents())
    last_run = {k: extra[k] for k in ("responses_from", "layers", "components", "dtype",
                                      "response_only")}
    write_json(out_dir / "_provenance.json", {
        "variant": extra["variant"], "prompt_set": extra["prompt_set"], "model": model,
        "n_layers": extra["n_layers"], "family": extra["family"], **_held_by_all(held),
        "last_run": last_run,
        "libraries": library_versions(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
    })
