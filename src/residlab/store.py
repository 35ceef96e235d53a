"""Files on disk: atomic writes, run directories, JSONL records.

Everything is written to a temporary file in the target's directory and renamed into place,
so a crash leaves either the old file or the new one, never half of one. Long jobs record
their progress as whole files (one per shard) and resume by skipping the ones that exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from residlab.errors import UsageError

__all__ = [
    "atomic_path",
    "write_bytes",
    "new_timestamped_dir",
    "read_jsonl",
    "write_json",
    "write_jsonl",
    "write_npy",
    "write_text",
    "write_yaml",
]


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def write_bytes(target: str | Path, data: bytes) -> None:
    """Write ``data`` to a unique temp file beside ``target`` and rename it into place
    (one open, one write, one rename: cheap enough for thousands of small files)."""
    target = Path(target)
    temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def write_text(target: str | Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, data: Any, *, compact: bool = False) -> None:
    """Pretty JSON, or ``compact`` (fast, numpy arrays allowed) for large machine-read files."""
    if compact:
        import orjson

        write_bytes(target, orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY
                                         | orjson.OPT_APPEND_NEWLINE))
        return
    write_text(target, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def write_yaml(target: str | Path, data: Any) -> None:
    write_text(target, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def write_jsonl(target: str | Path, records: Iterable[dict[str, Any]]) -> None:
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    write_text(target, "".join(lines))


def write_npy(target: str | Path, array: np.ndarray) -> None:
    with atomic_path(target) as temp, temp.open("wb") as handle:
        np.save(handle, array, allow_pickle=False)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file; a malformed line raises with file and line number."""
    records = []
    with Path(path).open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}:{line_no}: malformed JSON line ({error.msg})") from None
    return records


def new_timestamped_dir(parent: str | Path) -> Path:
    """Create ``parent/<YYYYmmdd-HHMMSS>`` (with a suffix if that name is taken)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a new run directory under {parent}")
