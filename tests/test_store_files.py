"""Files we write: modes follow the umask for every kind, and temp files of a killed run go."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import torch

from residlab import store


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_output_kind_respects_the_umask(tmp_path):
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        store.write_json(tmp_path / "a.json", {"x": 1})
        store.write_npy(tmp_path / "b.npy", np.zeros(3))
        with store.atomic_path(tmp_path / "c.safetensors") as temp:
            save_file({"t": torch.zeros(2)}, str(temp))
        os.umask(0o077)
        store.write_text(tmp_path / "d.txt", "private")
    finally:
        os.umask(old)
    assert [_mode(tmp_path / n) for n in ("a.json", "b.npy", "c.safetensors")] == [0o644] * 3
    assert _mode(tmp_path / "d.txt") == 0o600


def test_temp_files_of_a_stopped_writer_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # this process has exited
    stale = tmp_path / f".x.json.{dead_pid}.0123abcd.tmp"
    live = tmp_path / f".y.json.{os.getpid()}.0123abcd.tmp"
    other = tmp_path / ".notes.tmp"  # not ours: never touched
    for path in (stale, live, other):
        path.write_text("half")
    store._swept.discard(tmp_path)
    store.write_json(tmp_path / "z.json", {})
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, other.name, "z.json"])
