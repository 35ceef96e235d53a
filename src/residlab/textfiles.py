"""Reading a user's text file with an error that names the file (not a bare codec error)."""

from __future__ import annotations

from pathlib import Path

from residlab.errors import UsageError

__all__ = ["read_user_text"]


def read_user_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a file in another encoding is a one-line error naming it
    and the byte offset, so the user knows which file to convert."""
    try:
        return Path(path).read_text("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{what} {str(path)!r} is not UTF-8 text (byte {error.start}: "
                         f"{error.object[error.start:error.start + 1]!r}); save it as UTF-8"
                         ) from None
