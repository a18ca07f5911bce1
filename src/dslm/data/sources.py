"""Text sources: where documents come from and how each record format is read.

A source is named on the command line: ``embedded`` (the corpus shipped in this package), ``tfds``
(TFDS ``wikipedia/20230601.en``), ``hf`` (HF datasets ``wikimedia/wikipedia`` ``20231101.en``), a
local path, or one or more Debian documentation packages (``kernel-docs python-docs ...`` or the
alias ``english``; see :mod:`dslm.data.packages`, which exports them to a local JSONL file). Local
files are ``.jsonl`` (one JSON object with a ``text`` field per line; ``.gz`` allowed) or ``.txt``
(one sentence or paragraph per line, documents separated by blank lines), or a folder of them.
The two remote sources are streamed once into a local ``{"title", "text"}`` JSONL file
(``export_documents``), which is then read like any other local file.

Bad lines (not UTF-8, not JSON, no ``text``) are skipped and counted in a :class:`SkipLog`, or
stop the run with a one-line error naming the file and line when ``strict`` is set.
"""
from __future__ import annotations

import gzip
import importlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

from dslm.data.packages import is_package_source, resolve_package_sources
from dslm.errors import ConfigError, UsageError

EMBEDDED_CORPUS = Path(__file__).resolve().parent / "embedded_corpus.jsonl.gz"
EMBEDDED_VOCAB = Path(__file__).resolve().parent / "embedded_vocab.txt"
TFDS_NAME = "wikipedia/20230601.en"
HF_PATH, HF_CONFIG = "wikimedia/wikipedia", "20231101.en"
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")


@dataclass(frozen=True)
class Source:
    """A resolved ``--source``: ``kind`` is embedded / tfds / hf / path / packages; ``files`` are the
    local files to read (empty for a remote or package source until it is exported); ``packages``
    the Debian package sources to read (aliases expanded)."""
    kind: str
    name: str
    files: tuple[Path, ...] = ()
    packages: tuple[str, ...] = ()


def resolve_source(spec: str | Sequence[str]) -> Source:
    """Turn ``--source`` value(s) into a :class:`Source`, checking that a local path exists and
    holds files of a supported format. Several values are allowed for Debian package sources only."""
    names = [spec] if isinstance(spec, str) else list(spec)
    if not names:
        raise ConfigError("{source}: no source given")
    if len(names) > 1 or is_package_source(names[0]):
        chosen = resolve_package_sources(names)
        return Source("packages", "+".join(names), packages=tuple(s.name for s in chosen))
    spec = names[0]
    if spec == "embedded":
        return Source("embedded", "embedded", (EMBEDDED_CORPUS,))
    if spec == "tfds":
        return Source("tfds", f"tfds:{TFDS_NAME}")
    if spec == "hf":
        return Source("hf", f"hf:{HF_PATH}/{HF_CONFIG}")
    path = Path(spec)
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES)))
        if not files:
            raise UsageError(f"{path}: folder holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return Source("path", str(path.resolve()), files)
    if not path.exists():
        raise ConfigError(f"{{source}} {spec}: no such file or folder (expected embedded, tfds, hf, a Debian "
                          "package source such as english, or a path)")
    if not path.name.endswith(LOCAL_SUFFIXES):
        raise UsageError(f"{path}: unsupported file type (expected {', '.join(LOCAL_SUFFIXES)})")
    return Source("path", str(path.resolve()), (path.resolve(),))


@dataclass
class SkipLog:
    """Counts of skipped lines by reason, with the first place each reason was seen."""
    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    first: dict = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        if self.strict:
            raise UsageError(f"{where}: {reason}")
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        return ", ".join(f"{n} {reason} (first at {self.first[reason]})" for reason, n in self.counts.items())


class DocumentReader:
    """Iterate the document texts of local files, counting raw bytes read (``bytes_read``) and
    skipped lines (``skips``)."""

    def __init__(self, files: Iterable[Path], skips: SkipLog):
        self.files = list(files)
        self.skips = skips
        self.bytes_read = 0

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            reader = self._jsonl if path.name.endswith((".jsonl", ".jsonl.gz")) else self._txt
            try:
                yield from reader(path)
            except (OSError, EOFError) as e:
                raise UsageError(f"{path}: cannot read ({e})") from None

    def _lines(self, path: Path) -> Iterator[tuple[int, str | None]]:
        """(line number, text) for each line; text is None when the line is not UTF-8."""
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            for number, raw in enumerate(f, 1):
                self.bytes_read += len(raw)
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.skips.skip("lines not UTF-8", f"{path}:{number}")
                    yield number, None

    def _jsonl(self, path: Path) -> Iterator[str]:
        for number, line in self._lines(path):
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self.skips.skip("lines not JSON", f"{path}:{number}")
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                self.skips.skip("lines without a 'text' string", f"{path}:{number}")
            elif text.strip():
                yield text

    def _txt(self, path: Path) -> Iterator[str]:
        lines: list[str] = []
        for _, line in self._lines(path):
            if line is None:
                continue
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines)
                lines = []
        if lines:
            yield "".join(lines)


def _optional_import(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"this source needs the '{module}' package: pip install {pip_name}") from None


def check_remote_available(source: Source) -> None:
    """Fail early (before any output is created) when a remote source's library is missing."""
    if source.kind == "tfds":
        _optional_import("tensorflow_datasets", "tensorflow-datasets tensorflow")
    elif source.kind == "hf":
        _optional_import("datasets", "datasets")


def tfds_records(data_dir: str | None = None) -> tuple[Iterable[dict], int | None]:
    """The training split of TFDS ``wikipedia/20230601.en`` as numpy records ``{"title": bytes,
    "text": bytes}`` and its size. With ``try_gcs`` TFDS reads the copy prepared on its public
    bucket instead of building the dump locally."""
    tfds = _optional_import("tensorflow_datasets", "tensorflow-datasets tensorflow")
    builder = tfds.builder(TFDS_NAME, data_dir=data_dir, try_gcs=True)
    builder.download_and_prepare()
    split = builder.info.splits["train"]
    return tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)), split.num_examples


def hf_records() -> tuple[Iterable[dict], int | None]:
    """HF datasets ``wikimedia/wikipedia`` (config ``20231101.en``), streamed: records with the
    columns id, url, title, text (all strings)."""
    datasets = _optional_import("datasets", "datasets")
    return datasets.load_dataset(HF_PATH, HF_CONFIG, split="train", streaming=True), None


def _as_text(value) -> str | None:
    """A record field as text: TFDS gives bytes, HF gives str; anything else is unusable."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def export_documents(records: Iterable[dict], total: int | None, out: Path, skips: SkipLog,
                     label: str, progress: bool = True) -> int:
    """Write ``records`` (TFDS or HF Wikipedia records) to ``out`` as ``{"title", "text"}`` JSONL,
    through ``out.tmp`` and a rename. Records whose text is missing or not UTF-8 are skipped and
    counted; returns the number of documents written."""
    tmp = out.with_name(out.name + ".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for number, record in enumerate(tqdm(records, total=total, desc=f"download {label}",
                                             unit="doc", disable=not progress), 1):
            text = _as_text(record.get("text")) if isinstance(record, dict) else None
            if text is None:
                skips.skip("records without UTF-8 text", f"{label} record {number}")
                continue
            title = _as_text(record.get("title")) or ""
            f.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
            written += 1
    tmp.replace(out)
    return written
