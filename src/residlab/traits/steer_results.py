"""Steering answers and results on disk, keyed by every setting that changes them.

```
experiments/{exp}/steering/{trait}/{variant}/     the variant that answered
  answers/{setting-digest}.jsonl                  one file per generation setting
  results.jsonl                                   judged rows of every setting and judge
```

A *setting* is what changes an answer besides its (layer, coefficient, question): the vector
(method, position, component, vector_variant), where it is added (``positions``) and how long
the answer may be (``max_new_tokens``). Results add the ``judge``. A rerun replaces only the
rows of its own setting, and :func:`summarize` never averages rows of different settings.
Rows written before a field existed read it as ``None`` and so form their own setting.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

from residlab.experiments import Experiment
from residlab.store import read_jsonl, write_jsonl

__all__ = ["RESULT_FIELDS", "SETTING_FIELDS", "answer_key", "answers_path", "format_summary",
           "load_results", "merge_rows", "result_key", "setting_of", "steering_dir",
           "stored_settings", "summarize"]

SETTING_FIELDS = ("method", "position", "component", "vector_variant", "positions",
                  "max_new_tokens")
RESULT_FIELDS = (*SETTING_FIELDS, "judge")


def steering_dir(experiment: Experiment, trait: str, variant: str) -> Path:
    return experiment.path / "steering" / trait / variant


def setting_of(row: dict, fields: tuple[str, ...] = RESULT_FIELDS) -> tuple:
    return tuple(row.get(name) for name in fields)


def answer_key(row: dict) -> tuple:
    """Identity of one answer: its generation setting, layer, coefficient and question."""
    return (*setting_of(row, SETTING_FIELDS), row["layer"], float(row["coefficient"]),
            row["question"])


def result_key(row: dict) -> tuple:
    """Identity of one judged row: :func:`answer_key` plus the judge."""
    return (*answer_key(row), row.get("judge"))


def answers_path(folder: Path, setting: dict) -> Path:
    """The answers file of one generation setting (a digest of its fields)."""
    text = json.dumps([setting.get(name) for name in SETTING_FIELDS])
    return folder / "answers" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"


def stored_settings(folder: Path) -> list[dict]:
    """The generation settings that have saved answers (read from each file's first row)."""
    out = []
    for path in sorted((folder / "answers").glob("*.jsonl")):
        rows = read_jsonl(path)
        if rows:
            out.append({name: rows[0].get(name) for name in SETTING_FIELDS})
    return out


def merge_rows(path: Path, rows: list[dict], key=result_key) -> Path:
    """Replace the rows of ``path`` that share a key with ``rows``; keep every other row."""
    old = read_jsonl(path) if path.is_file() else []
    new_keys = {key(r) for r in rows}
    write_jsonl(path, [r for r in old if key(r) not in new_keys] + rows)
    return path


def load_results(experiment: Experiment, trait: str, variant: str) -> list[dict]:
    path = steering_dir(experiment, trait, variant) / "results.jsonl"
    return read_jsonl(path) if path.is_file() else []


def _mean(rows: list[dict], field: str) -> float:
    return sum(r[field] for r in rows) / len(rows)


def summarize(results: list[dict]) -> list[dict]:
    """Per full setting and (layer, coefficient): mean trait and coherence, and the trait gain
    over the baseline (layer None) of the same setting."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in results:
        groups[(setting_of(row), row["layer"], float(row["coefficient"]))].append(row)
    baselines = {setting: _mean(rows, "trait_score")
                 for (setting, layer, _), rows in groups.items() if layer is None}
    order = sorted(groups, key=lambda k: (json.dumps(k[0], default=str), k[1] is not None,
                                          k[1] or 0, k[2]))
    out = []
    for setting, layer, coefficient in order:
        rows = groups[(setting, layer, coefficient)]
        trait = _mean(rows, "trait_score")
        out.append({**dict(zip(RESULT_FIELDS, setting, strict=True)), "layer": layer,
                    "coefficient": coefficient, "trait": trait,
                    "coherence": _mean(rows, "coherence_score"),
                    "gain": trait - baselines.get(setting, float("nan")), "n": len(rows)})
    return out


def _setting_line(row: dict) -> str:
    def shown(name: str) -> str:
        return "?" if row.get(name) is None else str(row[name])

    return (f"{shown('method')} {shown('position')} {shown('component')} "
            f"(vectors: {shown('vector_variant')}) positions={shown('positions')} "
            f"max_new_tokens={shown('max_new_tokens')} judge={shown('judge')}")


def format_summary(rows: list[dict]) -> str:
    """One table per setting, each under a line naming the setting."""
    lines: list[str] = []
    current = None
    for r in rows:
        setting = setting_of(r)
        if setting != current:
            current = setting
            lines += ([""] if lines else []) + [
                _setting_line(r), f"{'layer':>6} {'coef':>8} {'trait':>7} {'coherence':>10} "
                f"{'gain':>7}"]
        layer = "base" if r["layer"] is None else str(r["layer"])
        lines.append(f"{layer:>6} {r['coefficient']:>8g} {r['trait']:>7.1f} "
                     f"{r['coherence']:>10.1f} {r['gain']:>+7.1f}")
    return "\n".join(lines)
