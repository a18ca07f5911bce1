"""``dataset.json``: the manifest of a prepared dataset directory, written last.

It records what was asked for (``request``: source, vocabulary, split, so a rerun can tell whether
the directory already holds it), what came out (``counts``, per-split document counts, token dtype)
and the size and SHA-256 of every file. Its presence is what makes a directory complete: it is
written through a temporary file and a rename after everything else is in place.
"""
from __future__ import annotations

import json
from pathlib import Path

from dslm.data.files import sha256_file
from dslm.errors import UsageError

MANIFEST_FILE = "dataset.json"
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
