"""Turn a text source into a BERT pretraining dataset directory: the corpus is sentence-split and
tokenized with a WordPiece vocabulary (given or trained) into a memory-mapped token store with a
dataset.json manifest. Re-running a finished preparation does nothing."""
from __future__ import annotations

import argparse
from pathlib import Path

from dslm.data.packages import ALIASES, DEFAULT_PACKAGE_CACHE, PACKAGE_SOURCES, is_package_source
from dslm.data.prepare import DEFAULT_VOCAB_SIZE, prepare_dataset
from dslm.data.split import parse_split


def _package_help() -> str:
    listed = "; ".join(f"{s.name} ({s.package}, {s.format})" for s in PACKAGE_SOURCES.values())
    aliases = "; ".join(f"{a} = {' + '.join(parts)}" for a, parts in ALIASES.items())
    return f"Debian documentation packages: {listed}; alias {aliases}"


def _worker_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes (0 or more), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of processes (0 or more), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", nargs="+", default=["embedded"], metavar="SOURCE",
                        help="embedded (shipped corpus, no download), tfds (TFDS wikipedia/20230601.en), "
                             "hf (HF wikimedia/wikipedia 20231101.en), a .jsonl/.txt file or folder, or one "
                             f"or more {_package_help()} (their prose is cleaned, de-duplicated and "
                             "written to corpus.jsonl.gz in --out)")
    parser.add_argument("--out", default=None,
                        help="dataset directory (default: outputs/data/<source name>, several package "
                             "sources joined by '+')")
    parser.add_argument("--vocab", default=None, help="BERT vocab.txt to use instead of training one")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"size of the WordPiece vocabulary trained when --vocab is not given (default "
                             f"{DEFAULT_VOCAB_SIZE}; --source embedded without it uses the shipped 8192-token vocab)")
    parser.add_argument("--split", default="980,10,10", help="train,valid,test document weights")
    parser.add_argument("--workers", type=_worker_count, default=None,
                        help="tokenizer processes; 0 tokenizes in this process (default: one per CPU)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input line instead of skipping it")
    parser.add_argument("--force", action="store_true",
                        help="redo a directory that is already prepared (package sources: also read the "
                             ".deb files and clean their text again)")
    parser.add_argument("--tfds-data-dir", default=None, help="TFDS data directory (--source tfds)")
    parser.add_argument("--package-cache", default=str(DEFAULT_PACKAGE_CACHE), metavar="DIR",
                        help="package sources: folder with the .deb files (<package>_<version>_<arch>.deb); "
                             "a package missing there is fetched into it with 'apt-get download'")
    parser.add_argument("--deb", nargs="+", default=[], metavar="FILE",
                        help="package sources: .deb files to read instead of the cache's (each is matched "
                             "to its source by the package name in its control file)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _default_out(sources: list[str]) -> str:
    if len(sources) > 1 or is_package_source(sources[0]):
        name = "+".join(sources)
    else:
        source = sources[0]
        name = source if source in ("embedded", "tfds", "hf") else Path(source.rstrip("/")).name.split(".")[0]
    return str(Path("outputs") / "data" / (name or "corpus"))


def run(args: argparse.Namespace) -> int:
    source = args.source[0] if len(args.source) == 1 else args.source
    prepare_dataset(args.out or _default_out(args.source), source=source, vocab=args.vocab,
                    vocab_size=args.vocab_size, split=parse_split(args.split), workers=args.workers,
                    strict=args.strict, force=args.force, progress=not args.no_progress,
                    tfds_data_dir=args.tfds_data_dir, package_cache=args.package_cache, debs=args.deb)
    return 0
