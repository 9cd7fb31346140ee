"""Atomic file writes for the tokenizer files and the corpus.

A file is written under a unique temporary name in the target's directory (so
concurrent writers never share one) and renamed over the target only once it
is complete: a reader sees the old file or the new one, never a partial one,
and a failure leaves no temporary file behind. Temporary files are created
with ``open(..., "x")``, so they get the usual permissions (umask), unlike
``tempfile.mkstemp``'s 0600.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Dict, Iterator, IO, List, Tuple

__all__ = ["atomic_open", "write_files_atomically"]


def _temp_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``with atomic_open(path, "w", encoding=...) as f:`` writes ``f`` to a temporary file that
    replaces ``path`` when the block ends without an exception (and is deleted otherwise)."""
    if "w" not in mode:
        raise ValueError(f"mode: expected a write mode ('w' or 'wb'), got {mode!r}")
    tmp = _temp_name(path)
    f = open(tmp, mode.replace("w", "x"), **kwargs)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_files_atomically(files: Dict[str, str]) -> List[str]:
    """Write each ``{path: text}`` (UTF-8, ``\\n`` newlines): every file goes to a temporary name
    first, and the renames start only once all of them are written, so a failure while writing
    (disk full, permissions) changes none of the targets and leaves no temporary file."""
    written: List[Tuple[str, str]] = []
    try:
        for path, text in files.items():
            tmp = _temp_name(path)
            written.append((tmp, path))
            with open(tmp, "x", encoding="utf-8", newline="\n") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            _remove(tmp)
        raise
    return [path for _, path in written]
