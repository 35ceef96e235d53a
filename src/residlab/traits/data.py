"""Trait data: ``datasets/traits/{category}/{trait}/`` with ``positive.txt``,
``negative.txt`` (paired line by line), ``definition.txt`` (the judge's rubric) and
``steering.json`` (``{"questions": [...]}``). Your own ``./datasets/traits`` win over the
starter traits shipped with residlab."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from residlab.errors import NotFound, UsageError
from residlab.store import read_lines

__all__ = ["TraitData", "available_traits", "find_trait", "load_trait"]


@dataclass(frozen=True)
class TraitData:
    name: str  # e.g. "behavioral/refusal"
    path: Path
    positive: list[str]
    negative: list[str]
    definition: str
    questions: list[str]


def _roots() -> list[Path]:
    return [Path("datasets/traits"), Path(str(resources.files("residlab").joinpath("data/traits")))]


def available_traits() -> list[str]:
    names = set()
    for root in _roots():
        if root.is_dir():
            names |= {str(p.parent.relative_to(root)) for p in root.rglob("positive.txt")}
    return sorted(names)


def find_trait(name: str) -> Path:
    if ".." in Path(name).parts:
        raise UsageError(f"trait name {name!r} may not contain '..'")
    for root in _roots():
        if (root / name / "positive.txt").is_file():
            return root / name
    raise NotFound(f"no data for trait {name!r}; available: {', '.join(available_traits())} "
                      f"(or add datasets/traits/{name}/positive.txt and negative.txt)")


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"trait file {path} is missing")
    return [line.strip() for line in read_lines(path) if line.strip()]


def load_trait(name: str) -> TraitData:
    """Read and check a trait's files (paired, non-empty)."""
    path = find_trait(name)
    positive, negative = _lines(path / "positive.txt"), _lines(path / "negative.txt")
    if not positive:
        raise UsageError(f"{path}/positive.txt has no lines; a trait needs contrastive examples")
    if len(positive) != len(negative):
        raise UsageError(f"{path}: positive.txt has {len(positive)} lines but negative.txt has "
                         f"{len(negative)}; they pair up line by line, make the counts match")
    if len(positive) < 5:
        raise UsageError(f"{path}: {len(positive)} pairs is too few to hold out a test split; "
                         "write at least 5 (40+ recommended)")
    definition = (path / "definition.txt").read_text("utf-8").strip() if (
        path / "definition.txt").is_file() else ""
    questions: list[str] = []
    if (path / "steering.json").is_file():
        try:
            questions = json.loads((path / "steering.json").read_text("utf-8"))["questions"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{path}/steering.json must be {{\"questions\": [...]}}") from None
    return TraitData(name, path, positive, negative, definition, list(questions))
