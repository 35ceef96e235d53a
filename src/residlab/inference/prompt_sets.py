"""Prompt sets: ``datasets/inference/{name}.json``, a JSON list of
``{id, prompt, system_prompt?, note?}``. Nested names (``rm_syco/train_100``) are sub-folders.

Your own sets in ``./datasets/inference/`` win over the ones shipped with residlab.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from residlab.errors import NotFound, UsageError
from residlab.textfiles import read_user_text

__all__ = ["PromptItem", "available_prompt_sets", "find_prompt_set", "load_prompt_set"]

ALLOWED_KEYS = {"id", "prompt", "system_prompt", "note"}


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: str
    system_prompt: str | None = None
    note: str | None = None

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": self.prompt}]


def _roots() -> list[Path]:
    packaged = Path(str(resources.files("residlab").joinpath("data/inference")))
    return [Path("datasets/inference"), packaged]


def available_prompt_sets() -> list[str]:
    names = set()
    for root in _roots():
        if root.is_dir():
            names |= {str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.json")}
    return sorted(names)


def find_prompt_set(name: str) -> Path:
    if ".." in Path(name).parts:
        raise UsageError(f"prompt set name {name!r} may not contain '..'")
    for root in _roots():
        path = root / f"{name}.json"
        if path.is_file():
            return path
    raise NotFound(f"unknown prompt set {name!r}; available: "
                      f"{', '.join(available_prompt_sets())} (or add datasets/inference/"
                      f"{name}.json)")


def load_prompt_set(name: str) -> list[PromptItem]:
    """Read and check a prompt set; a malformed file names itself and the reason."""
    path = find_prompt_set(name)
    try:
        data = json.loads(read_user_text(path, "prompt set"))
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a JSON list of {{id, prompt}} objects")
    if not data:
        raise UsageError(f"{path} has no prompts; add {{id, prompt}} objects to its list")
    items, seen = [], set()
    for position, entry in enumerate(data):
        if not isinstance(entry, dict) or "id" not in entry or "prompt" not in entry:
            raise UsageError(f"{path}: entry {position} needs an 'id' and a 'prompt'")
        extra = set(entry) - ALLOWED_KEYS
        if extra:
            raise UsageError(f"{path}: entry {position} has unknown key(s) {sorted(extra)}")
        if not isinstance(entry["prompt"], str):
            raise UsageError(f"{path}: entry {position}: 'prompt' must be a string")
        item_id = str(entry["id"])
        if item_id in seen:
            raise UsageError(f"{path}: duplicate id {item_id!r}")
        if "/" in item_id or item_id.startswith("."):
            raise UsageError(f"{path}: id {item_id!r} cannot be used as a file name")
        seen.add(item_id)
        items.append(PromptItem(item_id, entry["prompt"], entry.get("system_prompt"),
                                entry.get("note")))
    return items
