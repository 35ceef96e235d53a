"""Crash-campaign helpers: run a ``residlab`` command in a subprocess, SIGKILL it at chosen
moments, resume it, and read what it left on disk back into plain values.

A tree is read as ``{relative path: value}`` with every file parsed (JSON / JSONL / YAML
records with volatile fields dropped, safetensors tensors + header metadata, ``.npy`` arrays),
so two runs compare equal exactly when they hold the same results. Temp files of atomic
writes and anything that does not parse are reported, since a finished run must have neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

RESIDLAB = [sys.executable, "-m", "residlab.cli"]
VOLATILE_KEYS = {"date", "capture_date", "created", "timestamp"}  # wall-clock stamps
TEMP_MARKERS = (".staging-",)
POLL_SECONDS = 0.05
PROCESS_TIMEOUT = 900.0


def cli_env() -> dict[str, str]:
    """The environment of every command: offline, experiments under the working directory,
    one compute thread (on a small shared machine, torch's spinning threads made these tiny
    runs up to 4x slower; the reference and the crashed runs use the same setting).

    ``RESIDLAB_CACHE_DIR`` is left as it is: the embedded model's dequantised copy lives there.
    """
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RESIDLAB_EXPERIMENTS_DIR": "experiments",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Outcome:
    """One process: how long it ran, whether we killed it, and how it ended."""

    argv: list[str]
    seconds: float
    returncode: int
    killed: bool
    output: str
    first_change: float | None = None  # seconds until the watched tree first changed

    def check(self) -> Outcome:
        assert self.killed or self.returncode == 0, (
            f"{' '.join(self.argv[2:])} exited {self.returncode}:\n{self.output[-3000:]}")
        return self


def _state(root: Path) -> set[tuple[str, int, int]]:
    """Cheap fingerprint of a tree: (path, size, mtime) of every file. ``os.walk`` skips
    folders removed while it looks (a command deleting its shards must not break the poll)."""
    out = set()
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                stat = os.stat(os.path.join(folder, name))
            except FileNotFoundError:  # renamed away while we looked
                continue
            out.add((os.path.join(folder, name), stat.st_size, stat.st_mtime_ns))
    return out


@dataclass(frozen=True)
class Kill:
    """When to SIGKILL a process: ``delay`` seconds after it starts, or after it first
    writes into the watched tree (``after_first_write``). Anchoring on the first write keeps
    kills inside the real work however long imports and model loading take on a busy machine."""

    delay: float
    after_first_write: bool = False

    def __str__(self) -> str:
        anchor = "its first write" if self.after_first_write else "start"
        return f"{self.delay:.2f} s after {anchor}"


def kill_before_rename(suffix: str, nth: int) -> str:
    """Python to run before a command: the process SIGKILLs itself just before the ``nth``
    rename onto a target ending in ``suffix``: the moment an atomic write is most exposed
    (its temp file is complete, the target not yet replaced), hit deterministically."""
    return (
        "import os, signal\n"
        "_replace, _seen = os.replace, [0]\n"
        "def _kill_on_rename(source, target, *args, **kwargs):\n"
        f"    if str(target).endswith({suffix!r}):\n"
        "        _seen[0] += 1\n"
        f"        if _seen[0] == {nth}:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return _replace(source, target, *args, **kwargs)\n"
        "os.replace = _kill_on_rename\n")


def run_cli(args: list[str], cwd: Path, *, kill: Kill | None = None,
            watch: Path | None = None, prelude: str | None = None) -> Outcome:
    """Run ``residlab ARGS`` in ``cwd``; SIGKILL its process group as ``kill`` says.

    With ``watch``, the tree is polled so the outcome says when the command first wrote there
    (the start of its real work, after imports and model loading). ``prelude`` is Python run
    in the command's process before the command itself.
    """
    argv = [*RESIDLAB, *args]
    if prelude is not None:
        launcher = f"{prelude}\nfrom residlab.cli import main\nraise SystemExit(main())\n"
        argv = [sys.executable, "-c", launcher, *args]
    with tempfile.TemporaryFile() as output:
        start = time.monotonic()
        process = subprocess.Popen(argv, cwd=cwd, env=cli_env(), stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        first_change = _wait(process, start, kill, watch)
        killed = process.returncode is None
        if killed:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        seconds = time.monotonic() - start
        output.seek(0)
        text = output.read().decode("utf-8", "replace")
    return Outcome(argv, seconds, process.returncode, killed and kill is not None, text,
                   None if first_change is None else first_change - start)


def _wait(process: subprocess.Popen, start: float, kill: Kill | None,
          watch: Path | None) -> float | None:
    """Wait for the process to end or its kill moment to come; returns when ``watch`` first
    changed (monotonic clock), polling it every ``POLL_SECONDS`` until then."""
    before = _state(watch) if watch is not None else None
    deadline = start + PROCESS_TIMEOUT
    if kill is not None and not kill.after_first_write:
        deadline = start + kill.delay
    changed = None
    while process.poll() is None and (now := time.monotonic()) < deadline:
        if before is not None and changed is None and _state(watch) != before:
            changed = now
            if kill is not None and kill.after_first_write:
                deadline = now + kill.delay
        polling = before is not None and changed is None
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, min(POLL_SECONDS if polling else 1.0, deadline - now)))
    return changed


def kill_plan(seed: int, reference: Outcome, count: int = 5, *,
              keeps_progress: bool) -> list[Kill]:
    """When to kill each of ``count`` chained processes.

    ``count`` moments are drawn uniformly on the reference run's timeline, from just before
    it first wrote output (or 10% of its duration) to 95% of it, so most kills land while
    files are being produced rather than during imports and model loading. A moment before
    the first write kills at that time after start; a later one kills that far into the work,
    counted from the process's own first write. A command that ``keeps_progress`` (shards, an
    append log, finished files) restarts where the previous kill left it, so its moments are
    sorted and each process is killed after the work between the previous moment and its own.
    """
    total = reference.seconds
    begin = reference.first_change if reference.first_change is not None else 0.1 * total
    low = max(0.1 * total, begin - 0.1 * total)
    rng = random.Random(seed)
    moments = [rng.uniform(low, max(0.95 * total, low + 0.1)) for _ in range(count)]
    plan, reached = [], begin
    for moment in sorted(moments) if keeps_progress else moments:
        if moment <= begin:  # while starting up: nothing done yet
            plan.append(Kill(moment))
        else:
            plan.append(Kill(moment - reached, after_first_write=True))
            reached = moment if keeps_progress else begin
    return plan


@dataclass
class Campaign:
    """Kill, resume-and-kill again, ..., then resume to completion, logging each step."""

    cwd: Path
    watch: Path
    log: list[str] = field(default_factory=list)

    def run(self, start: list[str], resume: Callable[[], list[str]], plan: list[Kill],
            after_kill: Callable[[], list[str]] = lambda: []) -> Outcome:
        """``start`` first, then ``resume()``; ``after_kill()`` lists problems seen after
        each kill (they are logged and returned by :meth:`problems`)."""
        args = start
        for number, kill in enumerate(plan, start=1):
            outcome = run_cli(args, self.cwd, kill=kill, watch=self.watch).check()
            state = (f"killed at {outcome.seconds:.2f} s" if outcome.killed
                     else f"finished before the kill ({outcome.seconds:.2f} s)")
            files = sum(1 for path in self.cwd.rglob("*") if path.is_file())
            self.log.append(f"kill {number}, {kill} ({' '.join(args[:2])}): {state}, "
                            f"{files} files in the tree")
            self.log += [f"  after kill {number}: {problem}" for problem in after_kill()]
            args = resume()
        final = run_cli(args, self.cwd).check()
        self.log.append(f"final resume ({' '.join(args[:2])}): {final.seconds:.1f} s")
        return final

    def problems(self) -> list[str]:
        return [line for line in self.log if line.startswith("  after kill")]

    def report(self) -> str:
        return "\n".join(self.log)


# ---- reading trees back ------------------------------------------------------------------


def is_temp(path: Path) -> bool:
    return path.name.endswith(".tmp") or any(m in path.name for m in TEMP_MARKERS)


def _normalise(value: Any, replace: dict[str, str]) -> Any:
    """Drop volatile keys, rewrite run-specific path fragments, recursively."""
    if isinstance(value, dict):
        return {k: _normalise(v, replace) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_normalise(v, replace) for v in value]
    if isinstance(value, str):
        for old, new in replace.items():
            value = value.replace(old, new)
    return value


def _jsonl(path: Path, *, allow_torn_tail: bool = False) -> list[Any]:
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    if torn and not allow_torn_tail:
        raise ValueError(f"last line has no newline ({len(torn)} bytes): cut short")
    return [json.loads(line) for line in lines if line.strip()]


def _safetensors(path: Path, replace: dict[str, str]) -> dict[str, Any]:
    from safetensors.torch import load_file

    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    metadata = {}
    for key, text in (header.get("__metadata__") or {}).items():
        try:
            metadata[key] = json.loads(text)
        except json.JSONDecodeError:
            metadata[key] = text
    return {"metadata": _normalise(metadata, replace), "tensors": load_file(str(path))}


def read_file(path: Path, replace: dict[str, str], *, allow_torn_tail: bool = False) -> Any:
    """A file's content as plain values; raises when it does not parse."""
    suffix = path.suffix
    if suffix == ".json":
        return _normalise(json.loads(path.read_text("utf-8")), replace)
    if suffix == ".jsonl":
        return _normalise(_jsonl(path, allow_torn_tail=allow_torn_tail), replace)
    if suffix in (".yaml", ".yml"):
        return _normalise(yaml.safe_load(path.read_text("utf-8")), replace)
    if suffix == ".safetensors":
        return _safetensors(path, replace)
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    return path.read_bytes()


def read_tree(root: Path, *, replace: dict[str, str] | None = None) -> dict[str, Any]:
    """``{relative path: parsed content}`` of every regular file under ``root``."""
    replace = {str(root): "<ROOT>", **(replace or {})}
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        for old, new in replace.items():
            name = name.replace(old, new)
        out[name] = read_file(path, replace)
    return out


def damaged_files(root: Path, *, during: bool = False) -> list[str]:
    """Temp files of atomic writes and files that do not parse, under ``root``.

    ``during`` (right after a kill): temp files are expected then and are not listed, and an
    append-only JSONL log may end in a torn line that the next run cuts off.
    """
    problems = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if is_temp(path):
            if not during:
                problems.append(f"{path.relative_to(root)}: leftover temp file "
                                f"({path.stat().st_size} bytes)")
            continue
        try:
            read_file(path, {}, allow_torn_tail=during)
        except Exception as error:  # any parser's error means a half-written file
            problems.append(f"{path.relative_to(root)}: does not parse "
                            f"({type(error).__name__}: {str(error)[:120]})")
    return problems


def record_key(record: Any) -> Any:
    """What makes a record unique: generation / eval key, steering key, else the record."""
    if isinstance(record, dict) and {"noise_id", "noise_scale", "prompt_index"} <= set(record):
        return (record["noise_id"], float(record["noise_scale"]), record["prompt_index"])
    if isinstance(record, dict) and {"question", "layer", "coefficient"} <= set(record):
        fields = ("method", "position", "component", "vector_variant", "positions", "layer",
                  "coefficient", "question")
        return tuple(json.dumps(record.get(f), sort_keys=True) for f in fields)
    return json.dumps(record, sort_keys=True, default=str)


def duplicate_records(tree: dict[str, Any]) -> list[str]:
    """JSONL files of a tree that hold two records with the same key."""
    problems = []
    for name, records in tree.items():
        if not name.endswith(".jsonl"):
            continue
        counts = Counter(record_key(r) for r in records)
        doubled = [key for key, n in counts.items() if n > 1]
        if doubled:
            problems.append(f"{name}: {len(doubled)} key(s) recorded twice, e.g. {doubled[0]}")
    return problems


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where two parsed values differ (tensors by ``torch.equal`` and dtype), or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
        return None if same else f"{where}: tensors differ"
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b))
        return None if same else f"{where}: arrays differ"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(a.keys() ^ b.keys(), key=str)} only on one side"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}/{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} items vs {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b, strict=True))
                     if (d := first_difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {str(a)[:80]!r} vs {str(b)[:80]!r}"


def compare_trees(reference: dict[str, Any], crashed: dict[str, Any]) -> list[str]:
    """Differences between an uninterrupted run's tree and a killed-and-resumed one."""
    problems = []
    missing, extra = sorted(reference.keys() - crashed.keys()), sorted(crashed.keys()
                                                                        - reference.keys())
    if missing:
        problems.append(f"missing after the crash campaign: {missing}")
    if extra:
        problems.append(f"extra after the crash campaign: {extra}")
    for name in sorted(reference.keys() & crashed.keys()):
        difference = first_difference(reference[name], crashed[name], name)
        if difference:
            problems.append(difference)
    return problems
