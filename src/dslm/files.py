"""Outputs that are either complete or absent: every file a command writes goes through a temporary
file in the same folder, is flushed to disk (fsync) and renamed over the target, and the folder is
synced, so a crash, a kill or a power cut leaves the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries: a rename into it) to disk; a no-op where the platform
    cannot open or sync it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path, mode: str = "w"):
    """``with atomic_output(path, "wb") as f: ...``: ``f`` writes ``path.<pid>.tmp`` (processes that
    write the same file at once never share one); on success it is fsynced and renamed to ``path``,
    on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path) as f:
        f.write(text)


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically (:func:`atomic_output`)."""
    with open(src, "rb") as source, atomic_output(dst, "wb") as target:
        shutil.copyfileobj(source, target, 1 << 24)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
