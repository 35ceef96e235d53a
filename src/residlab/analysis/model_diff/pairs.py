"""Two variants' captures of one prompt set, paired by prompt id, on identical tokens.

A model diff only means something when both variants read the very same tokens: the usual way
is to generate with one variant and capture the other with ``--responses-from``. Every check is
made here, from the capture headers alone, before any tensor is read: both variants exist and
have captures, they share prompt ids, each pair was captured over the same token ids (the token
hash each capture records, else the id lists), and which layers each variant holds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.inference.raw import Contents, contents, load_raw

__all__ = ["Pair", "captured_layers", "paired_captures"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    """One prompt's capture under variant A and under variant B (same token ids)."""

    prompt_id: str
    path_a: Path
    path_b: Path
    held_a: Contents
    held_b: Contents


def _capture_command(experiment: Experiment, prompt_set: str, variant: str, other: str) -> str:
    """The capture that provides ``variant``'s files: on its own responses when it has them,
    else on the other variant's (``--responses-from``)."""
    command = (f"residlab capture --experiment {experiment.name} --prompt-set {prompt_set} "
               f"--model-variant {variant}")
    if not any(experiment.responses_dir(variant, prompt_set).glob("*.json")):
        command += f" --responses-from {other}"
    return command


def _capture_files(experiment: Experiment, prompt_set: str, variant: str,
                   other: str) -> dict[str, Path]:
    """``{prompt id: capture file}`` of one variant; a ``.safetensors`` file wins over a
    legacy ``.pt`` file of the same prompt."""
    folder = experiment.raw_dir(variant, prompt_set)
    files = {p.stem: p for p in sorted(folder.glob("*.pt"))}
    files |= {p.stem: p for p in sorted(folder.glob("*.safetensors"))}
    if not files:
        raise NotFound(f"no captures of variant {variant} in {folder}; run "
                       f"'{_capture_command(experiment, prompt_set, variant, other)}' first")
    return files


def _header(path: Path) -> Contents:
    found = contents(path)
    if found is None:
        raise UsageError(f"{path} is corrupted or truncated; rerun capture with "
                         "--skip-existing to redo it")
    return found


def _token_ids(path: Path) -> tuple[list[int] | None, list[int] | None]:
    """``(prompt ids, response ids)`` a capture's metadata records (``None`` where absent):
    the fallback for files that record no token hash."""
    if path.suffix == ".pt":
        raw = load_raw(path)
        parts = {part: raw.get(part, {}) for part in ("prompt", "response")}
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("residlab", "{}"))
        parts = meta.get("parts", {})
    return tuple(parts.get(part, {}).get("token_ids") for part in ("prompt", "response"))


def _same_tokens(pair: Pair) -> bool:
    """Whether both captures hold the same tokens, split at the same prompt end. Compared
    by token hash when both record one, else by whichever id lists both record."""
    a, b = pair.held_a, pair.held_b
    if a.prompt_end is not None and b.prompt_end is not None and a.prompt_end != b.prompt_end:
        return False
    if a.token_sha is not None and b.token_sha is not None:
        return a.token_sha == b.token_sha
    ids_a, ids_b = _token_ids(pair.path_a), _token_ids(pair.path_b)
    return all(x is None or y is None or x == y for x, y in zip(ids_a, ids_b, strict=True))


def paired_captures(experiment: Experiment, variant_a: str, variant_b: str,
                    prompt_set: str) -> list[Pair]:
    """The prompts both variants captured, sorted by id, each checked to hold the same token
    ids under both. Prompts captured by one variant only are left out (logged)."""
    name_a, _ = experiment.variant(variant_a)
    name_b, _ = experiment.variant(variant_b)
    if name_a == name_b:
        raise UsageError(f"variant-a and variant-b are both {name_a}; compare two variants")
    files_a = _capture_files(experiment, prompt_set, name_a, name_b)
    files_b = _capture_files(experiment, prompt_set, name_b, name_a)
    common = sorted(set(files_a) & set(files_b))
    if not common:
        raise UsageError(f"variants {name_a} and {name_b} share no captured prompt ids in "
                         f"{prompt_set} ({len(files_a)} and {len(files_b)} captures); capture "
                         f"both on the same responses: "
                         f"'{_capture_command(experiment, prompt_set, name_a, name_b)}'")
    only = len(files_a) + len(files_b) - 2 * len(common)
    if only:
        log.warning("%d prompt(s) captured by one variant only are left out; %d are paired",
                    only, len(common))
    pairs = [Pair(pid, files_a[pid], files_b[pid], _header(files_a[pid]),
                  _header(files_b[pid])) for pid in common]
    for pair in pairs:
        if not _same_tokens(pair):
            raise UsageError(
                f"prompt {pair.prompt_id}: variants {name_a} and {name_b} were captured on "
                f"different token ids; capture one on the other's responses, e.g. 'residlab "
                f"capture --experiment {experiment.name} --prompt-set {prompt_set} "
                f"--model-variant {name_a} --responses-from {name_b}'")
    return pairs


def _held_by_all(helds: Sequence[Contents], component: str) -> set[int]:
    """Layers at which every capture holds ``component``."""
    return set.intersection(*({layer for layer, comp in h.pairs if comp == component}
                              for h in helds))


def captured_layers(pairs: Sequence[Pair], component: str, *,
                    names: tuple[str, str] = ("A", "B"),
                    wanted: Sequence[int] | None = None) -> list[int]:
    """The layers (of ``wanted``, default all) at which every capture of both variants holds
    ``component``. A layer that one variant holds and the other does not is an error naming
    the variant (``names``: the variants' names for messages)."""
    layers_a = _held_by_all([p.held_a for p in pairs], component)
    layers_b = _held_by_all([p.held_b for p in pairs], component)
    check = set(wanted) if wanted is not None else layers_a | layers_b
    for name, mine, theirs in ((names[0], layers_a, layers_b), (names[1], layers_b, layers_a)):
        if (mine - theirs) & check:
            raise UsageError(
                f"{component} layer(s) {sorted((mine - theirs) & check)} captured for variant "
                f"{name} only (the other holds {sorted(theirs) or 'none'}); capture both "
                "variants with the same --layers")
    mlp = " --capture-mlp" if component == "mlp_contribution" else ""
    if not check:
        raise UsageError(f"no capture of either variant holds {component}; capture both "
                         f"variants with it{mlp}")
    if check - layers_a:
        raise UsageError(f"{component} layer(s) {sorted(check - layers_a)} not captured by "
                         f"either variant (both hold {sorted(layers_a)}); capture them with "
                         f"--layers{mlp}")
    return sorted(check)
