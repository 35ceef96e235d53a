"""What made an output: the resolved command options, the model, the generation settings.

Every command writes one such record next to what it produced, so a folder says how to make
it again (and what differs from another folder) without anyone's memory.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["command_record", "write_command_record"]


def command_record(command: str, options: Any, *, model: dict[str, Any] | None = None,
                   generation: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """``{"command", "options", "model", "generation", "libraries", "date", ...}``."""
    from residlab.models import library_versions

    record = options.record() if hasattr(options, "record") else dict(options)
    return {
        "command": f"residlab {command}",
        "options": record,
        "model": model,
        "generation": generation,
        "libraries": library_versions(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }


def write_command_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as pretty JSON at ``path`` (atomically) and return the path."""
    from residlab.store import write_json

    write_json(path, record)
    return Path(path)
