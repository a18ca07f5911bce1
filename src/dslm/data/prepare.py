"""``prepare_dataset``: text source -> vocabulary -> sentence-split token store -> manifest.

Stages, each leaving either a complete file or nothing (temporary file + rename):

1. remote sources (tfds, hf) are streamed once into ``corpus.jsonl`` (kept across reruns); Debian
   package sources are read from their .deb files, cleaned and written to ``corpus.jsonl.gz`` with
   ``corpus.json`` beside it (kept across reruns of the same sources, redone with ``force``);
2. ``vocab.txt``: a copy of ``--vocab`` or a WordPiece vocabulary trained on the corpus;
3. ``tokens.bin`` / ``tokens.idx``: documents are read in order, grouped into ~256 kB tasks and
   sentence-split and tokenized by worker processes (a bounded number of tasks in flight, so memory
   does not grow with the corpus), then appended to the store in order;
4. ``dataset.json`` last: a directory without it is incomplete, and a rerun starts it over.

Stages 2-4 are built in ``.staging/`` inside the directory and moved into place only when all of
them are complete, so bad input (an empty or unreadable corpus, a bad vocabulary) leaves a dataset
already there untouched, also with ``force``. The move takes the old manifest away first and puts
the new one in last: a crash during it leaves a directory that a rerun recognises as incomplete.

A rerun on a complete directory prepared with the same request does nothing. A lock file keeps two
processes (for example two figure jobs calling :func:`ensure_embedded_dataset`) from preparing the
same directory at once. On any error the staging folder is removed again (and the directory, if this
call created it and it is empty).
"""
from __future__ import annotations

import collections
import dataclasses
import fcntl
import itertools
import multiprocessing
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from dslm import __version__
from dslm.files import copy_atomic, fsync_path, sha256_file, write_json_atomic
from dslm.data.manifest import FORMAT, MANIFEST_FILE, MANIFEST_VERSION, VERIFIED_FILE, check_files, read_manifest
from dslm.data.packages import (DEFAULT_PACKAGE_CACHE, PACKAGE_CORPUS, PACKAGE_SOURCES, export_packages,
                                exported_records, locate_debs)
from dslm.data.sentences import split_sentences
from dslm.data.sources import (EMBEDDED_VOCAB, DocumentReader, SkipLog, Source, check_remote_available, export_documents,
                               hf_records, resolve_source, tfds_records)
from dslm.data.split import DEFAULT_SPLIT, SPLITS, split_counts, split_documents
from dslm.data.store import BIN_FILE, IDX_FILE, TokenStore, TokenStoreWriter, token_dtype
from dslm.data.vocab import (SPECIAL_TOKENS, VOCAB_FILE, SpecialIds, Tokenizer, read_vocab, require_tokenizers,
                              train_vocab, write_vocab)
from dslm.errors import ConfigError, UsageError

REMOTE_CORPUS = "corpus.jsonl"
DEFAULT_VOCAB_SIZE = 30522
_STAGE_FILES = (VOCAB_FILE, BIN_FILE, IDX_FILE, MANIFEST_FILE)
_TASK_CHARS = 1 << 18
_LOCK_FILE = ".lock"
_STAGING = ".staging"


def prepare_dataset(out_dir: str | Path, source: str | Sequence[str] = "embedded", vocab: str | Path | None = None,
                    vocab_size: int | None = None, split: tuple[int, int, int] = DEFAULT_SPLIT,
                    workers: int | None = None, strict: bool = False, force: bool = False,
                    progress: bool = True, tfds_data_dir: str | None = None,
                    package_cache: str | Path | None = None, debs: Sequence[str | Path] = ()) -> dict:
    """Prepare (or find already prepared) the dataset directory ``out_dir`` and return its manifest.

    ``source``: ``embedded``, ``tfds``, ``hf``, a local path, or Debian package source names (a list,
    or the alias ``english``; see :mod:`dslm.data.sources` and :mod:`dslm.data.packages`).
    ``package_cache``: folder holding (or receiving) the packages' .deb files (default
    ``outputs/data/packages``); ``debs``: .deb files to use instead of the cache's.
    ``vocab``: a BERT vocab.txt to use; without it a WordPiece vocabulary of ``vocab_size`` tokens
    (default 30522) is trained on the corpus, except that the embedded corpus uses the vocabulary
    shipped with it unless ``vocab_size`` is given (so its dataset is the same on every machine).
    ``split``: document weights train/valid/test. ``workers``: tokenizer processes (default: one per
    CPU; 0 tokenizes in this process). ``strict``: stop at the first bad line instead of skipping
    it. ``force``: redo a directory that is complete or incompatible (the dataset there is replaced
    only once the new one is complete).
    Prints a summary; bad input raises :class:`UsageError` and leaves no output behind (and an
    earlier dataset in ``out_dir`` as it was)."""
    out = Path(out_dir)
    src = resolve_source(source)
    check_remote_available(src)
    if debs and src.kind != "packages":
        raise ConfigError("{deb} applies only to Debian package sources "
                          f"({', '.join(PACKAGE_SOURCES)}, english)")
    packages = (Path(package_cache) if package_cache is not None else DEFAULT_PACKAGE_CACHE, tuple(debs))
    if vocab is None and vocab_size is None and src.kind == "embedded":
        vocab = EMBEDDED_VOCAB
    vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ConfigError(f"{{vocab_size}} {vocab_size}: too small")
    given_vocab = read_vocab(vocab) if vocab is not None else None
    request = {"source": src.name, "split": list(split),
               "vocab": {"sha256": sha256_file(Path(vocab))} if vocab is not None else {"trained_size": vocab_size}}
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{{out}} {out}: exists and is not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        done = _finished(out, request, force)
        if done is not None:
            print(f"{out}: already prepared ({done['counts']['documents']:,} documents, "
                  f"{done['counts']['tokens']:,} tokens); nothing to do")
            return done
        stage = out / _STAGING
        try:
            require_tokenizers()   # here, not only in the workers (a pool restarts a worker that fails to start)
            _remove_staging(out)
            stage.mkdir()
            manifest = _prepare(out, stage, src, request, vocab, given_vocab, split, workers, strict, progress,
                                tfds_data_dir, packages, force)
            _publish(stage, out)
            return manifest
        finally:
            _remove_staging(out)
            if created and not (out / MANIFEST_FILE).exists():
                (out / _LOCK_FILE).unlink(missing_ok=True)
                if not any(out.iterdir()):
                    out.rmdir()


def ensure_embedded_dataset(out_dir: str | Path, vocab_size: int | None = None, progress: bool = False) -> Path:
    """Prepare the embedded corpus in ``out_dir`` unless it is already there; returns the path.
    For figure scripts and demo jobs that need a small dataset without a download."""
    prepare_dataset(out_dir, source="embedded", vocab_size=vocab_size, progress=progress)
    return Path(out_dir)


@contextmanager
def _locked(out: Path):
    """Hold an exclusive lock on ``out/.lock`` (the file stays: deleting it would let a waiting
    process and a newcomer hold two different locks)."""
    with open(out / _LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _finished(out: Path, request: dict, force: bool) -> dict | None:
    """The manifest when ``out`` already holds this request, complete and intact (sizes and SHA-256
    as recorded); None when it must be made."""
    if not (out / MANIFEST_FILE).exists() or force:
        return None
    manifest = read_manifest(out)
    if manifest["request"] != request:
        raise ConfigError(f"{out}: already holds a dataset prepared from {manifest['request']['source']} "
                          "with other settings; choose another {out} or pass {force}")
    try:
        check_files(out, manifest, checksums=True)
    except UsageError as e:
        raise ConfigError(f"{e}; pass {{force}} to prepare it again") from None
    return manifest


def _remove_staging(out: Path) -> None:
    """Delete the staging folder and temporary files a failed or interrupted run left in ``out``."""
    shutil.rmtree(out / _STAGING, ignore_errors=True)
    for tmp in out.glob("*.tmp"):
        tmp.unlink(missing_ok=True)


def _publish(stage: Path, out: Path) -> None:
    """Move the complete stage files from ``stage`` into ``out``: the old manifest goes first (from
    then on the directory reads as incomplete), the new manifest last."""
    for name in _STAGE_FILES:
        fsync_path(stage / name)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    (out / VERIFIED_FILE).unlink(missing_ok=True)
    fsync_path(out)
    for name in _STAGE_FILES:
        if name != MANIFEST_FILE:
            os.replace(stage / name, out / name)
    fsync_path(out)
    os.replace(stage / MANIFEST_FILE, out / MANIFEST_FILE)
    fsync_path(out)


def _prepare(out: Path, stage: Path, src: Source, request: dict, vocab: str | Path | None,
             given_vocab: list[str] | None, split: tuple[int, int, int], workers: int | None, strict: bool,
             progress: bool, tfds_data_dir: str | None, packages: tuple[Path, tuple], force: bool) -> dict:
    started = time.perf_counter()
    skips = SkipLog(strict)
    package_records = None
    if src.kind == "packages":
        package_records = _export_packages(out, src, *packages, force, progress)
        files = (out / PACKAGE_CORPUS,)
    else:
        files = src.files or (_export_remote(out, src, skips, progress, tfds_data_dir),)
    if given_vocab is not None:
        copy_atomic(Path(vocab), stage / VOCAB_FILE)
        tokens = given_vocab
    else:
        tokens = _train(files, request["vocab"]["trained_size"], strict, progress)
        write_vocab(tokens, stage / VOCAB_FILE)
    tokenize_started = time.perf_counter()
    reader = DocumentReader(files, skips)
    writer = TokenStoreWriter(stage, token_dtype(len(tokens)))
    try:
        _tokenize(reader, tokens, writer, workers, progress, sum(_plain_size(f) for f in files))
        if writer.n_docs == 0:
            raise UsageError(f"{src.name}: no documents with text"
                             + (f" ({skips.total} lines skipped: {skips.describe()})" if skips.total else ""))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - started
    manifest = _manifest(stage, src, files, request, vocab, tokens, writer, split, skips, reader.bytes_read,
                         package_records)
    write_json_atomic(stage / MANIFEST_FILE, manifest)
    _print_summary(out, manifest, skips, reader.bytes_read, seconds, time.perf_counter() - tokenize_started)
    return manifest


def _plain_size(path: Path) -> int:
    """Bytes a progress bar can count towards (compressed files report none)."""
    return 0 if path.name.endswith(".gz") else path.stat().st_size


def _export_remote(out: Path, src: Source, skips: SkipLog, progress: bool, tfds_data_dir: str | None) -> Path:
    """Stream a remote source to ``out/corpus.jsonl`` once; a complete earlier export is reused."""
    corpus = out / REMOTE_CORPUS
    if not corpus.exists():
        records, total = tfds_records(tfds_data_dir) if src.kind == "tfds" else hf_records()
        export_documents(records, total, corpus, skips, src.name, progress)
    return corpus


def _export_packages(out: Path, src: Source, cache: Path, debs: tuple, force: bool, progress: bool) -> list[dict]:
    """Read and clean the Debian package sources into ``out/corpus.jsonl.gz`` (a complete earlier
    export of the same sources is reused unless ``force``); their records for the manifest."""
    sources = [PACKAGE_SOURCES[name] for name in src.packages]
    records = None if force else exported_records(out, sources)
    if records is not None:
        print(f"{out / PACKAGE_CORPUS}: reusing the documents exported earlier "
              "(" + ", ".join(f"{r['source']} {r['documents']:,}" for r in records) + " documents)")
        return records
    return export_packages(sources, locate_debs(sources, cache, debs), out, progress)


def _train(files, vocab_size: int, strict: bool, progress: bool) -> list[str]:
    """Train the WordPiece vocabulary on one pass over the corpus (its skip counts are discarded:
    the tokenizing pass counts the same lines)."""
    reader = DocumentReader(files, SkipLog(strict))
    texts = tqdm(reader, desc="train vocab", unit="doc", disable=not progress)
    return train_vocab(iter(texts), vocab_size)


# --- tokenizing pass -------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None
_worker_error: BaseException | None = None


def _init_worker(tokens: list[str]) -> None:
    """Set up a worker; a failure is kept and raised by its first task (a pool whose initializer
    raises would restart the worker forever)."""
    global _worker_tokenizer, _worker_error
    try:
        _worker_tokenizer = Tokenizer(tokens)
    except Exception as e:  # noqa: BLE001 - re-raised in the parent by the first task
        _worker_error = e


def _encode_task(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if _worker_error is not None:
        raise _worker_error
    return encode_documents(texts, _worker_tokenizer)


def encode_documents(texts: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sentence-split and tokenize documents: (all token ids, tokens per sentence, sentences per
    document). Sentences without tokens and documents without sentences are dropped."""
    sentences, per_doc = [], []
    for text in texts:
        parts = split_sentences(text)
        sentences.extend(parts)
        per_doc.append(len(parts))
    ids = tokenizer.encode_batch(sentences)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    doc_of_sentence = np.repeat(np.arange(len(per_doc)), per_doc)
    kept = lengths > 0
    per_doc = np.bincount(doc_of_sentence[kept], minlength=len(per_doc))
    return flat, lengths[kept], per_doc[per_doc > 0]


def _tasks(reader: DocumentReader):
    batch, chars = [], 0
    for text in reader:
        batch.append(text)
        chars += len(text)
        if chars >= _TASK_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize(reader: DocumentReader, tokens: list[str], writer: TokenStoreWriter, workers: int | None,
              progress: bool, total_bytes: int) -> None:
    """Feed the reader's documents through the tokenizer workers into the writer, in order."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if "fork" not in multiprocessing.get_all_start_methods():
        workers = 0
    bar = tqdm(total=total_bytes or None, desc="tokenize", unit="B", unit_scale=True, disable=not progress)

    def write(result) -> None:
        writer.add(*result)
        bar.update(reader.bytes_read - bar.n)

    try:
        if workers == 0:
            tokenizer = Tokenizer(tokens)
            for task in _tasks(reader):
                write(encode_documents(task, tokenizer))
            return
        # The vocabulary training may have started Rust threads; forked workers must not reuse them.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        with multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokens,)) as pool:
            pending: collections.deque = collections.deque()
            for task in _tasks(reader):
                pending.append(pool.apply_async(_encode_task, (task,)))
                if len(pending) >= 2 * workers:
                    write(pending.popleft().get())
            while pending:
                write(pending.popleft().get())
    finally:
        bar.close()


# --- manifest and summary --------------------------------------------------------------------------

def _manifest(out: Path, src: Source, files: tuple[Path, ...], request: dict, vocab: str | Path | None,
              tokens: list[str], writer: TokenStoreWriter, split: tuple[int, int, int], skips: SkipLog,
              bytes_read: int, package_records: list[dict] | None) -> dict:
    checksums = {**writer.checksums, VOCAB_FILE: sha256_file(out / VOCAB_FILE)}
    source = {"kind": src.kind, "name": src.name, "files": [str(f) for f in files]}
    if package_records is not None:
        source["packages"] = package_records
    return {
        "format": FORMAT,
        "version": MANIFEST_VERSION,
        "created_by": f"dslm {__version__}",
        "request": request,
        "source": source,
        "vocab_origin": str(Path(vocab).resolve()) if vocab is not None else "trained on the corpus",
        "vocab_size": len(tokens),
        "special_ids": dataclasses.asdict(SpecialIds.of(tokens)),
        "token_dtype": str(writer.dtype),
        "counts": {"documents": writer.n_docs, "sentences": writer.n_sentences, "tokens": writer.n_tokens,
                   "text_bytes": bytes_read, "skipped_lines": dict(skips.counts)},
        "split": {"weights": list(split), "documents": split_counts(writer.n_docs, split),
                  "tokens": split_tokens(out, split)},
        "files": {name: {"bytes": (out / name).stat().st_size, "sha256": digest} for name, digest in checksums.items()},
    }


def split_tokens(data_dir: Path, split: tuple[int, int, int]) -> dict[str, int]:
    """Tokens in the documents of each split of the token store in ``data_dir``."""
    store = TokenStore(data_dir)
    doc_tokens = np.diff(np.asarray(store.sent_offsets)[np.asarray(store.doc_index)])
    ids = split_documents(store.n_docs, split)
    return {name: int(doc_tokens[ids[name]].sum()) for name in SPLITS}


def _print_summary(out: Path, manifest: dict, skips: SkipLog, bytes_read: int, seconds: float,
                   tokenize_seconds: float) -> None:
    c = manifest["counts"]
    mb = bytes_read / 1e6
    print(f"{out}: {c['documents']:,} documents, {c['sentences']:,} sentences, {c['tokens']:,} tokens "
          f"(vocab {manifest['vocab_size']:,}) from {mb:.1f} MB of text in {seconds:.1f} s "
          f"({mb / max(seconds, 1e-9):.2f} MB/s end to end, {mb / max(tokenize_seconds, 1e-9):.2f} MB/s tokenizing)")
    print("  split (documents / tokens): " + ", ".join(f"{k} {v:,} / {manifest['split']['tokens'][k]:,}"
                                                      for k, v in manifest["split"]["documents"].items()))
    if skips.total:
        print(f"  skipped {skips.total:,} bad lines: {skips.describe()}")
