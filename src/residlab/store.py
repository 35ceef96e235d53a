"""Files on disk: atomic writes, run directories, JSONL records.

Everything is written to a temporary file in the target's directory and renamed into place,
so a crash leaves either the old file or the new one, never half of one. Long jobs record
their progress as whole files (one per shard) and resume by skipping the ones that exist;
an append-only log (``append_jsonl``) keeps finished batches of a job that writes one file.

Every JSONL and line file is read here, split on ``"\n"`` only: JSON text written with
``ensure_ascii=False`` (and by orjson) keeps U+2028, U+2029 and U+0085 raw inside strings,
and ``str.splitlines()`` would cut a record there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from residlab.errors import UsageError

log = logging.getLogger(__name__)

__all__ = [
    "BadLine",
    "append_jsonl",
    "atomic_path",
    "drop_torn_tail",
    "write_bytes",
    "new_timestamped_dir",
    "parse_jsonl",
    "read_jsonl",
    "read_jsonl_tolerant",
    "publish_dir",
    "read_lines",
    "remove_stale_temps",
    "staging_dir",
    "write_json",
    "write_jsonl",
    "write_npy",
    "write_text",
    "write_yaml",
]


_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")
_swept: set[Path] = set()


def _temp_for(target: Path) -> Path:
    """``.name.<pid>.<random>.tmp`` beside ``target``: the pid tells a later run whether the
    writer is still alive (see :func:`remove_stale_temps`)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**22  # exists but is not ours / not a pid at all
    return True


def remove_stale_temps(folder: str | Path) -> int:
    """Delete temp files in ``folder`` left by writers that no longer run (a killed job);
    returns how many. Called once per folder and process by the writers below."""
    folder = Path(folder)
    removed = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            match = _TEMP_NAME.match(entry.name)
            if match and entry.is_file() and not _pid_alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    if removed:
        log.info("removed %d temp file(s) left in %s by a stopped run", removed, folder)
    return removed


def _open_temp(target: Path) -> tuple[int, Path]:
    """Create the temp file (mode 0666 less the umask, like any file the user makes)."""
    if target.parent not in _swept:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent)
        _swept.add(target.parent)
    temp = _temp_for(target)
    try:
        return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp
    except FileNotFoundError:  # the folder was removed since: make it again
        target.parent.mkdir(parents=True, exist_ok=True)
        return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp


def _user_file_mode() -> int:
    """0666 less the process umask (read without changing it where Linux allows)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success."""
    handle, temp = _open_temp(Path(target))
    os.close(handle)
    try:
        yield temp
        os.chmod(temp, _user_file_mode())  # writers such as safetensors create theirs 0600
        os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def write_bytes(target: str | Path, data: bytes) -> None:
    """Write ``data`` to a unique temp file beside ``target`` and rename it into place
    (one open, one write, one rename: cheap enough for thousands of small files)."""
    target = Path(target)
    handle, temp = _open_temp(target)
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


@dataclass(frozen=True)
class BadLine:
    """A line of a JSONL file that could not be read, and why."""

    path: Path
    line: int
    reason: str


def _split(data: bytes) -> list[bytes]:
    """Lines split on b"\n" only (a trailing b"\r" goes too); a final newline adds no line."""
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file, split on ``"\n"`` only (``\r\n`` is accepted)."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{str(path)!r} is not UTF-8 text (byte {error.start}); save it as "
                         "UTF-8") from None
    return [line.decode("utf-8") for line in _split(data)]


def parse_jsonl(data: bytes, path: str | Path) -> Iterator[tuple[int, Any] | BadLine]:
    """``(line number, value)`` for each non-blank line, or a :class:`BadLine` saying why not.

    A last line that does not parse and has no newline is reported as truncated (a writer
    was stopped mid-line), which callers may treat differently from a malformed line.
    """
    lines = _split(data)
    torn = bool(data) and not data.endswith(b"\n")
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield line_no, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            yield BadLine(Path(path), line_no, f"not UTF-8 ({error.reason})")
        except json.JSONDecodeError as error:
            truncated = torn and line_no == len(lines)
            reason = "truncated last line" if truncated else f"malformed JSON ({error.msg})"
            yield BadLine(Path(path), line_no, reason)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file; a malformed line raises with file and line number."""
    records = []
    for item in parse_jsonl(Path(path).read_bytes(), path):
        if isinstance(item, BadLine):
            raise UsageError(f"{path}:{item.line}: {item.reason}; fix or remove that line")
        records.append(item[1])
    return records


def read_jsonl_tolerant(path: str | Path) -> tuple[list[tuple[int, Any]], list[BadLine]]:
    """``(line number, record)`` pairs and the unreadable lines, for files that may hold a
    line torn by a crash or edited by hand: reading goes on past them."""
    records, bad = [], []
    for item in parse_jsonl(Path(path).read_bytes(), path):
        (bad if isinstance(item, BadLine) else records).append(item)
    return records, bad


def append_jsonl(target: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records to a log in one write, flushed and fsynced before returning, so a kill
    loses at most the lines of this call (left as a torn last line, see ``drop_torn_tail``)."""
    data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    with Path(target).open("ab") as handle:
        handle.write(data.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def drop_torn_tail(path: str | Path) -> None:
    """Cut a file back to its last newline, so appending after a crash starts a clean line."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


def new_timestamped_dir(parent: str | Path) -> Path:
    """Create ``parent/<YYYYmmdd-HHMMSS>`` (with a suffix if that name is taken)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for path in _timestamped_names(parent):
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a new run directory under {parent}")


def _timestamped_names(parent: Path) -> Iterator[Path]:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        yield parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")


def staging_dir(parent: str | Path) -> Path:
    """A fresh ``parent/.staging-<pid>-<random>`` to build a directory in before it is
    published whole (:func:`publish_dir`); staging folders of writers that no longer run
    (killed mid-way) are removed first."""
    import shutil

    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for entry in parent.glob(".staging-*"):
        pid = entry.name.removeprefix(".staging-").split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by a stopped run", entry)
    path = parent / f".staging-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def publish_dir(staging: str | Path, parent: str | Path) -> Path:
    """Rename a finished staging folder to ``parent/<YYYYmmdd-HHMMSS>``: the run directory
    appears whole or not at all."""
    for path in _timestamped_names(Path(parent)):
        try:
            os.rename(staging, path)
            return path
        except OSError:
            if not path.exists():
                raise
    raise RuntimeError(f"cannot name a new directory under {parent}")
