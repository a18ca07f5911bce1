"""``dataset.json``: the manifest of a prepared dataset directory, written last.

It records what was asked for (``request``: source, vocabulary, split, so a rerun can tell whether
the directory already holds it), what came out (``counts``, per-split document counts, token dtype)
and the size and SHA-256 of every file. Its presence is what makes a directory complete: it is
written through a temporary file and a rename after everything else is in place.

:func:`verify_files` checks every listed file against its recorded SHA-256 the first time a dataset
is loaded and then writes ``.verified`` (each file's digest, size, mtime and inode), so later loads
only compare ``stat`` results; a file changed since then is hashed again.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from dslm.errors import UsageError
from dslm.files import sha256_file, write_text_atomic

MANIFEST_FILE = "dataset.json"
VERIFIED_FILE = ".verified"
FORMAT = "dslm-pretraining-dataset"
MANIFEST_VERSION = 1
_REQUIRED = ("request", "counts", "split", "files", "token_dtype", "vocab_size")


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of ``data_dir``, after checking its format and version."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UsageError(f"{data_dir}: no {MANIFEST_FILE}; prepare it with 'dslm prepare-data --out {data_dir}'")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a valid manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{path}: not a dslm dataset manifest (format is not {FORMAT!r})")
    if manifest.get("version") != MANIFEST_VERSION:
        raise UsageError(f"{path}: dataset format version {manifest.get('version')}, this dslm reads "
                         f"version {MANIFEST_VERSION}; re-run 'dslm prepare-data --force'")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise UsageError(f"{path}: manifest lacks {', '.join(missing)}")
    return manifest


def check_files(data_dir: str | Path, manifest: dict, checksums: bool = False) -> None:
    """Check that every file the manifest lists is there with its recorded size (and SHA-256 when
    ``checksums``); a mismatch is a one-line error naming the file."""
    for name, info in manifest["files"].items():
        path = Path(data_dir) / name
        if not path.is_file():
            raise UsageError(f"{path}: missing (listed in {MANIFEST_FILE})")
        if path.stat().st_size != info["bytes"]:
            raise UsageError(f"{path}: {path.stat().st_size} bytes, {MANIFEST_FILE} says {info['bytes']} "
                             "(truncated or replaced)")
        if checksums and sha256_file(path) != info["sha256"]:
            raise UsageError(f"{path}: SHA-256 differs from {MANIFEST_FILE} (corrupt or replaced)")


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def verify_files(data_dir: str | Path, manifest: dict) -> list[str]:
    """Check every file the manifest lists against its recorded SHA-256, skipping those unchanged
    (same size, mtime and inode) since a check recorded in ``.verified``; a mismatch is a one-line
    :class:`UsageError` naming the file. Sizes are checked first (:func:`check_files`). The record
    is best effort: a read-only dataset is verified on every load. Returns the names hashed now."""
    data_dir = Path(data_dir)
    check_files(data_dir, manifest)
    stamp_path = data_dir / VERIFIED_FILE
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        if not isinstance(stamp, dict):
            stamp = {}
    except (OSError, ValueError):
        stamp = {}
    fresh, hashed = {}, []
    for name, info in manifest["files"].items():
        path = data_dir / name
        key = _stat_key(path)
        seen = stamp.get(name)
        if not (isinstance(seen, dict) and seen.get("sha256") == info["sha256"] and seen.get("stat") == key):
            if sha256_file(path) != info["sha256"]:
                raise UsageError(f"{path}: SHA-256 differs from {MANIFEST_FILE} (corrupt or replaced); "
                                 "re-run 'dslm prepare-data --force'")
            hashed.append(name)
        fresh[name] = {"sha256": info["sha256"], "stat": key}
    if hashed or stamp != fresh:
        with contextlib.suppress(OSError):     # a read-only dataset is checked again next time
            write_text_atomic(stamp_path, json.dumps(fresh, indent=1) + "\n")
    return hashed
