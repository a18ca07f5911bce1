"""Build the embedded corpus (run once by a maintainer; the result ships with the package).

The embedded corpus lets every job run without a download. It is English prose taken from text that
ships with CPython itself: the reference-manual topics in ``pydoc_data.topics``, the docstrings of
the standard library's modules, classes and functions, and its comment blocks (read with ``ast``
and as text; nothing is imported).
Only prose paragraphs are kept (code examples, tables and headings are dropped), each paragraph
becomes one line, and each manual topic / module / class becomes one document of the JSONL file
``embedded_corpus.jsonl.gz`` (``{"title", "text"}`` per line, gzip with a zero timestamp so the same
Python gives the same bytes). The text is (c) Python Software Foundation under the PSF License
Agreement, which is copied next to it as ``embedded_corpus.LICENSE.txt``.

A WordPiece vocabulary of ``EMBEDDED_VOCAB_SIZE`` tokens trained on the corpus ships with it as
``embedded_vocab.txt``: the ``tokenizers`` trainer breaks frequency ties in hash order, so a
vocabulary trained on each machine would differ, and with it every token id.

The shipped file was built with CPython 3.11.7; rebuilding with another version changes it, which
is why the generated file is shipped rather than rebuilt on each machine::

    python -m dslm.data.build_embedded
"""
from __future__ import annotations

import ast
import gzip
import json
import re
import shutil
import sys
from pathlib import Path

from dslm.data.vocab import train_vocab, write_vocab

HERE = Path(__file__).resolve().parent
CORPUS_FILE = HERE / "embedded_corpus.jsonl.gz"
LICENSE_FILE = HERE / "embedded_corpus.LICENSE.txt"
VOCAB_FILE = HERE / "embedded_vocab.txt"
EMBEDDED_VOCAB_SIZE = 8192

_MIN_PARAGRAPH_CHARS = 40
_WORD = re.compile(r"[A-Za-z]{3,}")
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "turtledemo", "__pycache__"}


def prose_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a docstring or manual page, each joined onto one line.

    A paragraph is a block of non-blank lines. It is kept when no line is indented (indented blocks
    are code or grammar), it does not start with markup (``>>>``, ``..``, bullets, underlines), it is
    long enough to hold a sentence, and mostly letters and spaces."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in block.strip("\n").splitlines()]
        if not lines or any(ln[:1].isspace() for ln in lines):
            continue
        if any(set(ln) <= set("*=-~^#+_ ") for ln in lines):  # headings and table rules
            continue
        para = " ".join(ln.strip() for ln in lines)
        if len(para) < _MIN_PARAGRAPH_CHARS or para.startswith((">>>", "..", "* ", "- ", "|", "+")):
            continue
        letters = sum(c.isalpha() or c == " " for c in para)
        if letters < 0.85 * len(para) or len(_WORD.findall(para)) < 6:
            continue
        kept.append(para)
    return kept


def comment_blocks(source: str) -> str:
    """The comment blocks of a source file (two or more consecutive ``#`` lines), as paragraphs."""
    blocks, current = [], []
    for line in source.splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            current.append(stripped.lstrip("#").strip())
            continue
        if len(current) >= 2:
            blocks.append("\n".join(current))
        current = []
    return "\n\n".join(blocks)


def _source_documents(path: Path, module: str) -> list[dict]:
    """One document per module (module and function docstrings, then comment blocks) and per class
    (class and method docstrings), in source order."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []

    def doc_of(node) -> list[str]:
        return prose_paragraphs(ast.get_docstring(node) or "")

    def functions(body) -> list[str]:
        return [p for node in body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                for p in doc_of(node)]

    module_paragraphs = doc_of(tree) + functions(tree.body) + prose_paragraphs(comment_blocks(source))
    docs = [{"title": module, "paragraphs": module_paragraphs}]
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs.append({"title": f"{module}.{node.name}", "paragraphs": doc_of(node) + functions(node.body)})
    return [{"title": d["title"], "text": "\n".join(d["paragraphs"])}
            for d in docs if sum(map(len, d["paragraphs"])) >= 2 * _MIN_PARAGRAPH_CHARS]


def collect_documents() -> list[dict]:
    """All documents of the corpus, in a fixed order (manual topics, then modules by path)."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        paragraphs = prose_paragraphs(topics[name])
        if paragraphs:
            docs.append({"title": f"reference:{name}", "text": "\n".join(paragraphs)})
    stdlib = Path(ast.__file__).resolve().parent
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _SKIPPED_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        docs.extend(_source_documents(path, module))
    return docs


def main() -> int:
    docs = collect_documents()
    with open(CORPUS_FILE, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for doc in docs:
            gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    write_vocab(train_vocab(iter(d["text"] for d in docs), EMBEDDED_VOCAB_SIZE), VOCAB_FILE)
    license_src = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt"
    shutil.copyfile(license_src, LICENSE_FILE)
    chars = sum(len(d["text"]) for d in docs)
    print(f"{CORPUS_FILE.name}: {len(docs)} documents, {chars / 1e6:.2f} M characters, "
          f"{CORPUS_FILE.stat().st_size / 1e6:.2f} MB compressed (CPython {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
