"""English prose from Debian documentation packages: ``--source kernel-docs python-docs ...``.

Each source is declared as data in :data:`PACKAGE_SOURCES`: the Debian package, which of its files
hold the text (globs on the paths inside the package; ``**/`` spans folders, ``*`` stays inside
one), their format (reST, HTML or POD) and the licence expected. The alias ``english`` names the
kernel, Python, PostgreSQL and Debian handbook sources (about 5.6M WordPiece tokens); ``perl-docs``
is there to be named on its own.

For each source the ``.deb`` is taken from ``--deb`` (a file given by the user) or the package cache
folder (``--package-cache``, default ``outputs/data/packages``); when neither has it, ``apt-get
download`` fetches it into the cache. The ``.deb`` is read in memory, in pure Python: its ``ar``
archive holds ``control.tar.*`` (the package name and version come from its ``control`` file) and
``data.tar.*`` (xz, gz, bz2 or uncompressed; zst when the ``zstandard`` module is installed), which
is streamed member by member, keeping only the wanted files and ``usr/share/doc/<package>/copyright``
(the licence: the ``License`` of the ``Files: *`` paragraph of a machine-readable copyright file,
otherwise the expected licence when its marker text is found in the file).

Every document is cleaned to plain paragraphs (one per line, a blank line between them; see
:func:`clean_rst`, :func:`clean_html`, :func:`clean_pod`); a paragraph that is mostly not words
(code, command lines, ASCII drawings) is left out. Then documents are dropped when they keep fewer
than :data:`MIN_WORDS` words (``short``), when less than half of their words survive cleaning
(``non_prose``: reference pages that are mostly code or tables), when they are not UTF-8 or not
valid gzip (``unreadable``) and when their normalised text (lower case, white space collapsed) was
already kept from this or an earlier source (``duplicate``).
The kept documents go to ``corpus.jsonl.gz`` as ``{"title", "text"}`` lines, in source order and by
path within a source; ``corpus.json`` records, per source, the package, version, SHA-256 of the
``.deb``, licence and the kept and dropped counts (copied into the dataset manifest).
"""
from __future__ import annotations

import gzip
import hashlib
import html
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from dslm.files import sha256_file, write_json_atomic
from dslm.errors import ConfigError, UsageError

DEFAULT_PACKAGE_CACHE = Path("outputs") / "data" / "packages"
PACKAGE_CORPUS = "corpus.jsonl.gz"
PACKAGE_CORPUS_INFO = "corpus.json"
MIN_WORDS = 50              # a kept document has at least this many words after cleaning
MIN_PROSE_SHARE = 0.5       # ... and keeps at least this share of its source words
MIN_PLAIN_WORDS = 0.5       # a kept paragraph has at least this share of plain words
CLEANER_VERSION = 1         # bump when cleaning changes: an exported corpus of another version is redone


@dataclass(frozen=True)
class PackageSource:
    """A ``--source`` read from a Debian package: ``include`` / ``exclude`` are globs on the paths
    inside the package, ``format`` is ``rst``, ``html`` or ``pod`` (gzipped members are unpacked
    first), ``licence`` the licence the package is expected to carry and ``licence_marker`` a phrase
    that identifies it in a copyright file that is not machine-readable."""
    name: str
    package: str
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    format: str
    licence: str
    licence_marker: str = ""


_KERNEL_DOC = "usr/share/doc/linux-doc-6.1/Documentation/"
PACKAGE_SOURCES: dict[str, PackageSource] = {s.name: s for s in (
    PackageSource("kernel-docs", "linux-doc-6.1",
                  include=(_KERNEL_DOC + "**/*.rst.gz", _KERNEL_DOC + "**/*.txt.gz"),
                  # translations are not English; device-tree bindings are property lists and
                  # features/ holds per-architecture support tables
                  exclude=(_KERNEL_DOC + "translations/**", _KERNEL_DOC + "devicetree/bindings/**",
                           _KERNEL_DOC + "features/**"),
                  format="rst", licence="GPL-2"),
    PackageSource("python-docs", "python3.11-doc",
                  include=("usr/share/doc/python3.11/html/_sources/**/*.rst.txt",), exclude=(),
                  format="rst", licence="PSF-2.0", licence_marker="PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2"),
    PackageSource("postgres-docs", "postgresql-doc-15",
                  include=("usr/share/doc/postgresql-doc-15/html/*.html",), exclude=(),
                  format="html", licence="PostgreSQL"),
    PackageSource("debian-handbook", "debian-handbook",
                  include=("usr/share/doc/debian-handbook/html/en-US/*.html",), exclude=(),
                  format="html", licence="GPL-2.0+ or CC-BY-SA-3.0"),
    PackageSource("perl-docs", "perl-doc",
                  include=("usr/share/perl/*/pod/*.pod",), exclude=(),
                  format="pod", licence="GPL-1+ or Artistic"),
)}
ALIASES: dict[str, tuple[str, ...]] = {"english": ("kernel-docs", "python-docs", "postgres-docs", "debian-handbook")}


def is_package_source(name: str) -> bool:
    return name in PACKAGE_SOURCES or name in ALIASES


def resolve_package_sources(names: Sequence[str]) -> list[PackageSource]:
    """The sources named (aliases expanded, each once, in the order given)."""
    chosen: list[str] = []
    for name in names:
        if not is_package_source(name):
            raise ConfigError(f"{{source}} {name}: not a Debian package source (expected one of "
                              f"{', '.join([*PACKAGE_SOURCES, *ALIASES])}); several {{source}} names are "
                              "allowed only for these")
        for part in ALIASES.get(name, (name,)):
            if part not in chosen:
                chosen.append(part)
    return [PACKAGE_SOURCES[n] for n in chosen]


# --- finding the .deb -------------------------------------------------------------------------------

def locate_debs(sources: Sequence[PackageSource], cache: Path, given: Sequence[str | Path] = (),
                download: Callable[[str, Path], Path] | None = None) -> dict[str, Path]:
    """package -> .deb file for each source: a ``given`` file holding that package, else the one
    ``.deb`` of the package in ``cache``, else one downloaded into ``cache`` (``download``, by
    default :func:`apt_download`)."""
    download = download or apt_download
    wanted = {s.package for s in sources}
    found: dict[str, Path] = {}
    for path in map(Path, given):
        if not path.is_file():
            raise ConfigError(f"{{deb}} {path}: no such file")
        package = read_control(path).get("Package", "")
        if package not in wanted:
            raise ConfigError(f"{{deb}} {path}: holds package {package or '(none)'}, which no chosen source reads "
                              f"(they read {', '.join(sorted(wanted))})")
        found[package] = path
    for source in sources:
        if source.package in found:
            continue
        cached = sorted(cache.glob(f"{source.package}_*.deb")) if cache.is_dir() else []
        if len(cached) > 1:
            raise ConfigError(f"{cache}: several .deb files of {source.package} ({', '.join(p.name for p in cached)}); "
                              "keep one or name it with {deb}")
        found[source.package] = cached[0] if cached else download(source.package, cache)
    return found


def apt_download(package: str, cache: Path) -> Path:
    """``apt-get download PACKAGE`` into ``cache``; the .deb it wrote."""
    by_hand = (f"download {package}'s .deb by hand (https://packages.debian.org/{package}) into {cache} "
               "or pass it with --deb FILE")
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise UsageError(f"{package}: no .deb in {cache} and no apt-get to download it; {by_hand}")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"{package}: downloading with 'apt-get download {package}' into {cache}")
    try:
        result = subprocess.run([apt_get, "download", package], cwd=cache, capture_output=True, text=True)
    except OSError as e:
        raise UsageError(f"{package}: apt-get download failed ({e}); {by_hand}") from None
    debs = sorted(cache.glob(f"{package}_*.deb"))
    if result.returncode != 0 or len(debs) != 1:
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise UsageError(f"{package}: apt-get download failed ({why}); {by_hand}")
    return debs[0]


# --- reading the .deb (ar archive of control.tar.* and data.tar.*) ----------------------------------

class _Window(io.RawIOBase):
    """Read-only view of ``size`` bytes of an open file from ``offset`` (one ar member)."""

    def __init__(self, f, offset: int, size: int):
        self._f, self._pos, self._end = f, offset, offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._end - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._pos)
        data = self._f.read(n)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _ar_members(f, path: Path) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of the members of the ar archive ``f``."""
    size = os.fstat(f.fileno()).st_size
    if f.read(8) != b"!<arch>\n":
        raise UsageError(f"{path}: not a Debian package (no ar archive header)")
    members, pos = {}, 8
    while pos < size:
        f.seek(pos)
        header = f.read(60)
        if len(header) < 60 or header[58:60] != b"`\n":
            raise UsageError(f"{path}: corrupt .deb (bad ar member header at byte {pos})")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            length = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise UsageError(f"{path}: corrupt .deb (bad ar member size at byte {pos})") from None
        if pos + 60 + length > size:
            raise UsageError(f"{path}: truncated .deb (member {name} needs {length} bytes, "
                             f"{size - pos - 60} left)")
        members[name] = (pos + 60, length)
        pos += 60 + length + (length & 1)
    return members


def _open_tar(f, path: Path, members: dict[str, tuple[int, int]], stem: str) -> tarfile.TarFile:
    """The member ``stem.tar[.xz|.gz|.bz2|.zst]`` of the .deb as a streamed tar archive."""
    names = [n for n in members if n == stem + ".tar" or n.startswith(stem + ".tar.")]
    if not names:
        raise UsageError(f"{path}: corrupt .deb (no {stem}.tar.* member)")
    name = names[0]
    raw = io.BufferedReader(_Window(f, *members[name]), 1 << 20)
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UsageError(f"{path}: {name} is zstd-compressed, which needs the 'zstandard' module: "
                             "pip install zstandard") from None
        return tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(raw), mode="r|")
    modes = {".tar": "r|", ".tar.xz": "r|xz", ".tar.gz": "r|gz", ".tar.bz2": "r|bz2"}
    mode = next((m for suffix, m in modes.items() if name == stem + suffix), None)
    if mode is None:
        raise UsageError(f"{path}: unsupported member {name} (expected {stem}.tar, .tar.xz, .tar.gz, "
                         ".tar.bz2 or .tar.zst)")
    return tarfile.open(fileobj=raw, mode=mode)


_READ_ERRORS = (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, OSError, ValueError)


def _tar_files(tar: tarfile.TarFile, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(path without ``./``, bytes) of the regular files of a streamed tar whose path ``keep`` accepts."""
    for member in tar:
        name = member.name[2:] if member.name.startswith("./") else member.name
        if member.isfile() and keep(name):
            yield name, tar.extractfile(member).read()


def _open_deb(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None


def read_control(path: Path) -> dict[str, str]:
    """The fields of the ``control`` file of the .deb at ``path`` (Package, Version, ...)."""
    try:
        with _open_deb(path) as f:
            members = _ar_members(f, path)
            with _open_tar(f, path, members, "control") as tar:
                files = dict(_tar_files(tar, lambda name: name == "control"))
    except UsageError:
        raise
    except _READ_ERRORS as e:
        raise UsageError(f"{path}: corrupt .deb (control archive: {e})") from None
    if "control" not in files:
        raise UsageError(f"{path}: corrupt .deb (control archive has no control file)")
    fields, key = {}, None
    for line in files["control"].decode("utf-8", "replace").splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def read_deb_files(path: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the files in the .deb's data archive that ``keep`` accepts, streamed (the
    archive is never unpacked to disk)."""
    try:
        with _open_deb(path) as f:
            members = _ar_members(f, path)
            with _open_tar(f, path, members, "data") as tar:
                yield from _tar_files(tar, keep)
    except UsageError:
        raise
    except _READ_ERRORS as e:
        raise UsageError(f"{path}: corrupt .deb (data archive: {e})") from None


def _glob_regex(pattern: str) -> str:
    """A path glob as a regular expression: ``**/`` is any number of folders, ``*`` and ``?`` stay
    inside one path segment."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def member_filter(source: PackageSource) -> Callable[[str], bool]:
    """Whether a path inside the package is one of the source's documents."""
    include = re.compile("|".join(f"(?:{_glob_regex(p)})" for p in source.include) + r"\Z")
    exclude = re.compile("|".join(f"(?:{_glob_regex(p)})" for p in source.exclude) + r"\Z") if source.exclude else None
    return lambda name: bool(include.match(name)) and not (exclude and exclude.match(name))


def licence_of(copyright_text: str | None, source: PackageSource) -> str:
    """The licence a Debian copyright file states for the package's files (see the module doc)."""
    if copyright_text is None:
        return f"unknown (no usr/share/doc/{source.package}/copyright)"
    if copyright_text.startswith("Format:"):
        for paragraph in re.split(r"\n\s*\n", copyright_text):
            fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", paragraph, flags=re.M))
            if fields.get("Files", "").strip() == "*" and fields.get("License"):
                return fields["License"].strip()
    if source.licence_marker and source.licence_marker.lower() in copyright_text.lower():
        return source.licence
    return f"unknown (see usr/share/doc/{source.package}/copyright)"


# --- cleaning ------------------------------------------------------------------------------------

_PLAIN_WORD = re.compile(r"[(\"'\u201c\u2018\[]*[A-Za-z]+(?:['\u2019-][A-Za-z]+)*[.,;:!?)\"'\u201d\u2019\]]*")


def plain_word_share(text: str) -> float:
    """Share of the white-space separated words that are plain words (letters, an inner apostrophe or
    hyphen, surrounding punctuation): about 0.9 for English prose, low for code and tables."""
    words = text.split()
    return sum(1 for w in words if _PLAIN_WORD.fullmatch(w)) / len(words) if words else 0.0


def _paragraphs_text(paragraphs: Iterable[str]) -> str:
    kept = []
    for p in paragraphs:
        p = " ".join(p.split())
        if p and plain_word_share(p) >= MIN_PLAIN_WORDS:
            kept.append(p)
    return "\n\n".join(kept)


# reST ---------------------------------------------------------------------------------------------

_ADORNMENT = re.compile(r"([!-/:-@\[-`{-~])\1{2,}\s*\Z")     # a line of one repeated punctuation char
_GRID_TABLE = re.compile(r"\+(?:[-=]+\+)+\s*\Z")
_SIMPLE_TABLE = re.compile(r"=+(?:[ \t]+=+)+\s*\Z")
_DIRECTIVE = re.compile(r"\.\.\s+(?:[\w-]+:)?(?P<name>[\w-]+)::(?:\s+(?P<arg>.*))?\Z")
_OPTION = re.compile(r":[\w-][\w .-]*:(?:\s|\Z)")
_FIELD = re.compile(r":(?![\w.+-]+(?::[\w.+-]+)*:`)[^:`]+:(?:\s|\Z)")    # ':Author: x', not a role
_BULLET = re.compile(r"(?:[-*+\u2022]|\(\*\)|\(?(?:\d+|[a-zA-Z#]|[ivxIVX]+)[.)])\s+")
_VERSION_ARGS = re.compile(r"(?:\d+(?:\.\d+)*\s*){1,2}")

# How the argument of a directive whose body is kept is read: "prose" (text), "version" (version
# numbers, then text), "title" (a heading) or "none" (a signature or expression, dropped). Every
# other directive (code-block, toctree, tables, images, index, kernel-doc, ...) is dropped whole.
_KEPT_DIRECTIVES: dict[str, str] = {
    **dict.fromkeys(("note", "warning", "tip", "hint", "important", "caution", "attention", "danger",
                     "error", "seealso", "impl-detail"), "prose"),
    **dict.fromkeys(("versionadded", "versionchanged", "deprecated", "deprecated-removed"), "version"),
    **dict.fromkeys(("topic", "sidebar", "admonition", "rubric"), "title"),
    # descriptions of API objects (Python and C domains): the body is the prose description
    **dict.fromkeys(("function", "method", "class", "attribute", "data", "exception", "decorator",
                     "decoratormethod", "classmethod", "staticmethod", "abstractmethod",
                     "coroutinefunction", "coroutinemethod", "describe", "object", "cmdoption",
                     "option", "envvar", "opcode", "pdbcommand", "member", "macro", "type", "var",
                     "struct", "union", "enum", "enumerator", "only", "container", "glossary",
                     "availability"), "none"),
}

_INLINE = re.compile(r"""
    ``(?P<literal>.+?)``(?!\w)
  | (?P<role>:(?:[A-Za-z][\w.+-]*:)+)`(?P<role_text>[^`]+)`_{0,2}
  | (?<![\w`])`(?P<ref>[^`]+)`(?:_{1,2}|:[\w.+-]+:)?
  | (?<![\w*])\*\*(?P<strong>[^*\s](?:[^*]*[^*\s])?)\*\*(?![\w*])
  | (?<![\w*])\*(?P<emph>[^*\s](?:[^*]*[^*\s])?)\*(?![\w*])
  | (?<![\w|])\|(?P<subst>[^|\s](?:[^|]*[^|\s])?)\|_{0,2}(?![\w|])
  | \s*\[(?:\#[\w-]*|\*|\d+)\]_(?!\w)
""", re.X)
_TARGET_TEXT = re.compile(r"(?s)(.*?)\s*<[^<>]*>\Z")


def _role_text(role: str, text: str) -> str:
    """What a reader sees for ``:role:`text```: the title of ``title <target>``, the last part of
    ``~a.b.c``, ``PEP 8`` for ``:pep:`8```."""
    text = " ".join(text.split())
    titled = _TARGET_TEXT.match(text)
    if titled and titled.group(1):
        return titled.group(1)
    text = text.lstrip("!")
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    base = role.strip(":").rsplit(":", 1)[-1]
    if base in ("pep", "rfc"):
        return f"{base.upper()} {text}"
    return text


def _inline(match: re.Match) -> str:
    if match["literal"] is not None:
        return match["literal"]
    if match["role"] is not None:
        return _role_text(match["role"], match["role_text"])
    if match["ref"] is not None:
        return _role_text("", match["ref"])
    for group in ("strong", "emph", "subst"):
        if match[group] is not None:
            return match[group]
    return ""                                       # footnote / citation reference


def rst_inline(text: str) -> str:
    """Inline reST markup to plain text: roles, literals, emphasis, references, escapes."""
    text = _INLINE.sub(_inline, text)
    return re.sub(r"\\(.)", r"\1", text.replace("\\ ", ""))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int, base: int) -> int:
    """First line at or after ``start`` that is not blank and indented at most ``base``."""
    i = start
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        i += 1
    return i


def _dedent(lines: list[str]) -> list[str]:
    width = min((_indent(l) for l in lines if l.strip()), default=0)
    return [l[width:] for l in lines]


def _rst_paragraphs(lines: list[str]) -> Iterator[str]:
    """The prose paragraphs of reST lines (tab-expanded, right-stripped), inline markup still in.
    Titles come as :class:`_Title` strings."""
    i, n = 0, len(lines)
    literal_after = None            # text column of the paragraph that ended with '::'
    while i < n:
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        indent, stripped = _indent(line), line.strip()
        if literal_after is not None:
            column, literal_after = literal_after, None
            if indent > column:                                  # the literal block after '::'
                i = _block_end(lines, i, column)
                continue
        if stripped == ".." or stripped.startswith(".. "):     # directive, comment, target, footnote
            end = _block_end(lines, i + 1, indent)
            directive = _DIRECTIVE.match(stripped)
            if directive and directive["name"] in _KEPT_DIRECTIVES:
                yield from _directive_paragraphs(_KEPT_DIRECTIVES[directive["name"]], directive["arg"] or "",
                                                 lines[i + 1:end])
            i = end
            continue
        skipped = _skip_block(lines, i, indent, stripped)
        if skipped is not None:
            i = skipped
            continue
        if _ADORNMENT.match(stripped):                           # overline of a title, or a transition
            if i + 2 < n and lines[i + 1].strip() and _ADORNMENT.match(lines[i + 2].strip()):
                yield _Title(lines[i + 1].strip())
                i += 3
            else:
                i += 1
            continue
        if (i + 1 < n and _ADORNMENT.match(lines[i + 1].strip()) and _indent(lines[i + 1]) == indent
                and not lines[i + 1].strip().startswith("::")):   # a title and its underline
            yield _Title(stripped)
            i += 2
            continue
        column, text, i = _paragraph_lines(lines, i, indent, stripped)
        paragraph = " ".join(text)
        if paragraph.endswith("::"):            # 'text::' -> 'text:', 'text ::' -> 'text', '::' -> nothing
            literal_after = column
            before = paragraph[:-2]
            paragraph = before.rstrip() if not before or before[-1].isspace() else before + ":"
            if not paragraph:
                continue
        yield paragraph


def _skip_block(lines: list[str], i: int, indent: int, stripped: str) -> int | None:
    """Where a block with no prose that starts at line ``i`` ends (a doctest, a grid or simple table,
    a field list of metadata), or None if line ``i`` starts none."""
    if stripped.startswith(">>>") or _GRID_TABLE.match(stripped):    # doctest block, grid table
        while i < len(lines) and lines[i].strip():
            i += 1
        return i
    if _SIMPLE_TABLE.match(stripped):
        return _simple_table_end(lines, i)
    if _FIELD.match(stripped):                                       # field list (:Author: ...)
        return _block_end(lines, i + 1, indent)
    return None


def _paragraph_lines(lines: list[str], i: int, indent: int, stripped: str) -> tuple[int, list[str], int]:
    """A paragraph (or list item) starting at line ``i``: its lines up to a blank line, a new item
    or a change of indentation. Returns (its text column, its stripped lines, the next line)."""
    bullet = _BULLET.match(stripped)
    column = indent + (bullet.end() if bullet else 0)
    text = [stripped[bullet.end():] if bullet else stripped]
    i += 1
    while i < len(lines) and lines[i].strip() and _indent(lines[i]) == (column if bullet else indent):
        if _BULLET.match(lines[i].strip()) or _DIRECTIVE.match(lines[i].strip()):
            break
        text.append(lines[i].strip())
        i += 1
    return column, text, i


class _Title(str):
    """A section title among the paragraphs."""


def _simple_table_end(lines: list[str], start: int) -> int:
    """The line after a simple table: its last border line is one followed by a blank line."""
    i = start + 1
    while i < len(lines):
        if _SIMPLE_TABLE.match(lines[i].strip()) and (i + 1 == len(lines) or not lines[i + 1].strip()):
            return i + 1
        i += 1
    return i


def _directive_paragraphs(kind: str, arg: str, body: list[str]) -> Iterator[str]:
    """Paragraphs of a kept directive: its argument as ``kind`` says, then its content. The lines
    right after the directive, up to a blank line, continue the argument (a signature, a note's
    first paragraph) or are options (``:name: value``, dropped)."""
    head, k = [], 0
    while k < len(body) and body[k].strip() and not body[k].lstrip().startswith(".."):
        if not _OPTION.match(body[k].strip()):
            head.append(body[k].strip())
        k += 1
    argument = " ".join([arg.strip(), *head]).strip()
    if kind == "version":
        argument = _VERSION_ARGS.sub("", argument, count=1).strip()
    if kind in ("prose", "version", "title") and argument:
        yield argument
    yield from _rst_paragraphs(_dedent(body[k:]))


def clean_rst(text: str) -> tuple[str, str]:
    """(title, plain text) of a reST document: prose paragraphs one per line with a blank line
    between them. Dropped: directives and their bodies (those describing an API object, admonitions,
    version notes and a few containers keep their prose: see ``_KEPT_DIRECTIVES``), literal blocks
    after ``::``, doctest blocks, grid and simple tables, comments, targets, footnotes, substitution
    definitions, field lists, title adornments. Roles become their text (``:ref:`text <target>``` ->
    text), ````literal```` -> literal, ``*emph*`` -> emph; paragraphs mostly not words are left out."""
    lines = [l.rstrip() for l in text.expandtabs(8).splitlines()]
    paragraphs = list(_rst_paragraphs(lines))
    title = rst_inline(next((p for p in paragraphs if isinstance(p, _Title)), ""))
    return " ".join(title.split()), _paragraphs_text(rst_inline(p) for p in paragraphs)


# HTML ---------------------------------------------------------------------------------------------

_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
_DROPPED_TAGS = frozenset("script style nav header footer pre table head noscript svg math form button "
                          "select textarea iframe object template".split())
_DROPPED_CLASSES = frozenset((
    "navheader", "navfooter", "docnav", "toc", "list-of-tables", "list-of-figures", "list-of-examples",
    "programlisting", "screen", "synopsis", "cmdsynopsis", "funcsynopsis", "literallayout", "table",
    "informaltable", "indexterm", "breadcrumbs", "sphinxsidebar", "related", "footer", "header",
    "highlight", "toc-backref"))
_DROPPED_IDS = frozenset(("banner", "title", "navigation", "footer", "header", "sidebar"))
_BLOCK_TAGS = frozenset("p div h1 h2 h3 h4 h5 h6 li dt dd ul ol dl blockquote br hr section article aside "
                        "figure figcaption caption tr td th title main body html address center details "
                        "summary".split())


class _HTMLText(HTMLParser):
    """Collects the text of the blocks of an HTML page outside the dropped elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []     # open elements: (tag, dropped)
        self.dropping = 0                            # open dropped elements
        self.paragraphs: list[str] = []
        self.current: list[str] = []
        self.title: list[str] = []
        self.in_title = False
        self.all_words = 0                           # words of all text, dropped or not

    def _flush(self) -> None:
        if self.current:
            self.paragraphs.append("".join(self.current))
            self.current = []

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in _VOID:
            if tag in ("br", "hr") and not self.dropping:
                self._flush()
            return
        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        dropped = tag in _DROPPED_TAGS or bool(classes & _DROPPED_CLASSES) or attributes.get("id") in _DROPPED_IDS
        self.stack.append((tag, dropped))
        self.dropping += dropped
        if tag in _BLOCK_TAGS and not self.dropping:
            self._flush()

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr") and not self.dropping:
            self._flush()

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in _VOID or not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            open_tag, dropped = self.stack.pop()
            self.dropping -= dropped
            if open_tag == tag:
                break
        if tag in _BLOCK_TAGS and not self.dropping:
            self._flush()

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        self.all_words += len(data.split())
        if not self.dropping:
            self.current.append(data)

    def close(self):
        super().close()
        self._flush()


def _html_text(text: str) -> tuple[str, list[str], int]:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    return " ".join("".join(parser.title).split()), parser.paragraphs, parser.all_words


def clean_html(text: str) -> tuple[str, str]:
    """(title, plain text) of an HTML page (stdlib ``html.parser``): the text of its blocks, one
    paragraph per line with a blank line between them. Dropped: head, script, style, nav, header,
    footer, pre, tables, forms, and the elements whose class marks code, tables of contents or
    navigation (DocBook ``navheader``/``navfooter``/``programlisting``/``screen``/``toc``, publican
    ``docnav``, the ``banner`` and ``title`` bars); inline elements (code, em, a) keep their text.
    Paragraphs mostly not words are left out."""
    title, paragraphs, _ = _html_text(text)
    return title, _paragraphs_text(paragraphs)


# POD ------------------------------------------------------------------------------------------------

_POD_CODES = re.compile(r"[A-Z]<<+\s(.*?)\s>>+|[A-Z]<([^<>]*)>")


def _pod_inline(text: str) -> str:
    def code(match: re.Match) -> str:
        inner = match.group(1) if match.group(1) is not None else match.group(2)
        letter = match.group(0)[0]
        if letter in "XZ":                           # index entry, zero-width
            return ""
        if letter == "L":                            # L<text|target> -> text; L<target> -> target
            inner = inner.split("|", 1)[0] if "|" in inner else inner.replace('"', "").replace("/", " ")
        if letter == "E":
            return {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}.get(inner, html.unescape(f"&{inner};"))
        return inner

    previous = None
    while previous != text:                          # inner codes first: repeat until none is left
        previous, text = text, _POD_CODES.sub(code, text)
    return text


def clean_pod(text: str) -> tuple[str, str]:
    """(title, plain text) of a Perl POD document: ordinary paragraphs (formatting codes such as
    ``C<code>`` and ``L<text|target>`` become their text), ``=head`` headings and ``=item`` texts;
    verbatim (indented) paragraphs, ``=begin``/``=for`` blocks and other commands are dropped."""
    paragraphs, title, skipping, pod = [], "", None, True
    for block in re.split(r"\n[ \t]*\n", text.expandtabs(8)):
        if not block.strip():
            continue
        if skipping is not None:                     # inside =begin FORMAT ... =end FORMAT
            if block.lstrip().startswith(f"=end {skipping}"):
                skipping = None
            continue
        if block.startswith("="):
            command, _, rest = block.partition(" ")
            command = command.split("\n", 1)[0]
            rest = " ".join(rest.split()) if " " in block.split("\n", 1)[0] else ""
            if command == "=cut":
                pod = False
            elif command in ("=pod", "=encoding"):
                pod = True
            elif command == "=begin":
                skipping = rest.split(" ", 1)[0]
            elif command.startswith("=head") and rest:
                paragraphs.append(_pod_inline(rest))
            elif command == "=item" and rest and rest not in ("*", "-") and not re.fullmatch(r"\d+\.?", rest):
                paragraphs.append(_pod_inline(rest.lstrip("*- ")))
            if command != "=cut":
                pod = True
            continue
        if not pod or block[0] in " \t":             # code, or a verbatim paragraph
            continue
        paragraphs.append(_pod_inline(block))
    heads = re.findall(r"^=head1\s+NAME\s*\n+\s*(.+)", text, flags=re.M)
    title = " ".join(_pod_inline(heads[0]).split()) if heads else (paragraphs[0] if paragraphs else "")
    return " ".join(title.split()), _paragraphs_text(paragraphs)


_CLEANERS = {"rst": clean_rst, "html": clean_html, "pod": clean_pod}


def _source_words(fmt: str, text: str) -> int:
    """Words of a document before cleaning (for HTML: of all its text, tags left out)."""
    return _html_text(text)[2] if fmt == "html" else len(text.split())


# --- export --------------------------------------------------------------------------------------

@dataclass
class SourceRecord:
    """What the export took from one source (its entry in corpus.json and the dataset manifest)."""
    source: str
    package: str
    version: str
    deb: str
    deb_sha256: str
    licence: str
    files: int = 0
    documents: int = 0
    words: int = 0
    dropped_short: int = 0
    dropped_non_prose: int = 0
    dropped_duplicate: int = 0
    dropped_unreadable: int = 0

    def as_dict(self) -> dict:
        return {"source": self.source, "package": self.package, "version": self.version, "deb": self.deb,
                "deb_sha256": self.deb_sha256, "licence": self.licence, "files": self.files,
                "documents": self.documents, "words": self.words,
                "dropped": {"short": self.dropped_short, "non_prose": self.dropped_non_prose,
                            "duplicate": self.dropped_duplicate, "unreadable": self.dropped_unreadable}}


def _decode(data: bytes, name: str) -> str | None:
    """The text of a document file (gunzipped when its name ends in .gz); None when it is not
    UTF-8 or not valid gzip."""
    try:
        return (gzip.decompress(data) if name.endswith(".gz") else data).decode("utf-8")
    except (UnicodeDecodeError, OSError, EOFError, zlib.error):
        return None


def read_source(source: PackageSource, deb: Path, seen: set[bytes], progress: bool = False
                ) -> tuple[SourceRecord, list[dict]]:
    """Clean the documents of one source's .deb. ``seen`` holds the hashes of the normalised texts
    kept so far (updated): a document already there is a duplicate. Returns the record and the kept
    ``{"title", "text"}`` documents, ordered by path."""
    control = read_control(deb)
    if control.get("Package") != source.package:
        raise ConfigError(f"{deb}: holds package {control.get('Package') or '(none)'}, "
                          f"{{source}} {source.name} reads {source.package}")
    copyright_path = f"usr/share/doc/{source.package}/copyright"
    wanted = member_filter(source)
    copyright_text, raw = None, []
    files = read_deb_files(deb, lambda name: name == copyright_path or wanted(name))
    for name, data in tqdm(files, desc=f"read {source.name}", unit="file", disable=not progress):
        if name == copyright_path:
            copyright_text = data.decode("utf-8", "replace")
        else:
            raw.append((name, data))
    record = SourceRecord(source.name, source.package, control.get("Version", ""), deb.name, sha256_file(deb),
                          licence_of(copyright_text, source), files=len(raw))
    documents = []
    for name, data in sorted(raw):
        text = _decode(data, name)
        if text is None:
            record.dropped_unreadable += 1
            continue
        title, cleaned = _CLEANERS[source.format](text)
        words = len(cleaned.split())
        if words < MIN_WORDS:
            record.dropped_short += 1
            continue
        if words < MIN_PROSE_SHARE * _source_words(source.format, text):
            record.dropped_non_prose += 1
            continue
        digest = hashlib.sha256(" ".join(cleaned.lower().split()).encode()).digest()
        if digest in seen:
            record.dropped_duplicate += 1
            continue
        seen.add(digest)
        documents.append({"title": title or name.rsplit("/", 1)[-1], "text": cleaned})
        record.documents += 1
        record.words += words
    return record, documents


def export_packages(sources: Sequence[PackageSource], debs: dict[str, Path], out_dir: Path,
                    progress: bool = True) -> list[dict]:
    """Write the cleaned documents of ``sources`` to ``out_dir/corpus.jsonl.gz`` (through a
    temporary file and a rename) and their records to ``out_dir/corpus.json``; returns the records."""
    corpus, tmp = out_dir / PACKAGE_CORPUS, out_dir / (PACKAGE_CORPUS + ".tmp")
    seen: set[bytes] = set()
    records = []
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        for source in sources:
            record, documents = read_source(source, debs[source.package], seen, progress)
            for doc in documents:
                f.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
            records.append(record.as_dict())
            d = record.as_dict()["dropped"]
            print(f"{source.name}: {source.package} {record.version} ({record.licence}): {record.documents:,} "
                  f"documents, {record.words:,} words kept of {record.files:,} files (dropped {d['short']} short, "
                  f"{d['non_prose']} non-prose, {d['duplicate']} duplicate, {d['unreadable']} unreadable)")
    write_json_atomic(out_dir / PACKAGE_CORPUS_INFO, {"sources": [s.name for s in sources],
                                                      "cleaner_version": CLEANER_VERSION, "packages": records})
    tmp.replace(corpus)
    return records


def exported_records(out_dir: Path, sources: Sequence[PackageSource]) -> list[dict] | None:
    """The records of an earlier complete export of the same sources by this cleaner, else None."""
    info_path = out_dir / PACKAGE_CORPUS_INFO
    if not (out_dir / PACKAGE_CORPUS).is_file() or not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if info.get("sources") != [s.name for s in sources] or info.get("cleaner_version") != CLEANER_VERSION:
        return None
    return info.get("packages")
