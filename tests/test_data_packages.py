"""Debian package sources: .deb reading (ar + tar built here), licence and version, reST / HTML / POD
cleaning (exact output), drop and duplicate counts, download errors, and prepare_dataset end to end
on a fake package cache. No network: apt-get is replaced by a script or removed from PATH."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest

from dslm.cli import main
from dslm.data import prepare_dataset
from dslm.data.command import _default_out
from dslm.data.manifest import read_manifest
from dslm.data.packages import (PACKAGE_SOURCES, PackageSource, clean_html, clean_pod, clean_rst, licence_of,
                                locate_debs, member_filter, read_control, read_deb_files, read_source)
from dslm.data.split import split_documents
from dslm.data.store import TokenStore
from dslm.errors import UsageError

# --- building .deb files ----------------------------------------------------------------------------


def _tar(files: dict[str, bytes], compression: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members:
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data)
        if len(data) % 2:
            out.append(b"\n")
    return b"".join(out)


def make_deb(path, package: str, version: str, files: dict[str, str | bytes], copyright: str | None = None,
             compression: str = "xz"):
    """A .deb of ``package`` holding ``files`` (path inside the package -> content; a str is UTF-8
    encoded, gzipped when the path ends in .gz) and ``usr/share/doc/<package>/copyright``."""
    data = {}
    for name, content in files.items():
        raw = content.encode() if isinstance(content, str) else content
        data[name] = gzip.compress(raw, mtime=0) if name.endswith(".gz") and isinstance(content, str) else raw
    if copyright is not None:
        data[f"usr/share/doc/{package}/copyright"] = copyright.encode()
    control = f"Package: {package}\nVersion: {version}\nArchitecture: all\nDescription: test\n tiny\n".encode()
    suffix = {"xz": ".xz", "gz": ".gz", "": ""}[compression]
    path.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", _tar({"control": control}, "xz")),
                          (f"data.tar{suffix}", _tar(data, compression))]))
    return path


def dep5(licence: str) -> str:
    return (f"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: x\n\n"
            f"Files: *\nCopyright: 2020 Someone\nLicense: {licence}\n\nFiles: debian/*\nCopyright: 2021 Other\n"
            "License: MIT\n")


_WORDS = ("the kernel reads each page from memory when a process asks for it and the scheduler decides "
          "which task runs next on every processor while the driver waits for the device").split()


def prose(n_sentences: int, seed: int) -> str:
    """Deterministic English-like sentences of 8-14 words."""
    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(_WORDS, int(rng.integers(8, 15)))).capitalize() + "."
                 for _ in range(n_sentences)]
    return " ".join(sentences)


# --- cleaning: exact output -------------------------------------------------------------------------

RST = """.. _intro:

=====
Intro
=====

:Author: Someone

This is *the* first paragraph with a :ref:`link text <target>` and
``literal code`` spanning two lines.

.. note:: Notes keep their
   text.

.. code-block:: c

   int x = 1;

Example::

    literal block dropped

Another paragraph ::

    also dropped

.. |sub| replace:: substitution text

.. comment line
   and its body

+-----+-----+
| a   | b   |
+-----+-----+

=====  =====
col1   col2
=====  =====
x      y
=====  =====

Section
-------

- first item of a list
  continued here
- second item with :func:`~os.path.join` and :pep:`8`

.. function:: spam(eggs)
   :noindex:

   Return spam with **eggs**.

   .. versionchanged:: 3.2
      Accepts eggs.

.. toctree::
   :maxdepth: 2

   hidden/page

>>> print(1)
1
"""


def test_clean_rst_exact():
    title, text = clean_rst(RST)
    assert title == "Intro"
    assert text.split("\n\n") == [
        "Intro",
        "This is the first paragraph with a link text and literal code spanning two lines.",
        "Notes keep their text.",
        "Example:",
        "Another paragraph",
        "Section",
        "first item of a list continued here",
        "second item with join and PEP 8",
        "Return spam with eggs.",
        "Accepts eggs.",
    ]


def test_clean_rst_drops_code_like_paragraphs_and_nested_directives():
    text = ("Intro text for the reader.\n\n"
            "   CONFIG_FOO=y CONFIG_BAR=m 0x1f 0x2e\n\n"          # an indented block that is not prose
            ".. note::\n   .. versionchanged:: 3.8\n      Fixed in Python 3.8.\n")
    assert clean_rst(text)[1] == "Intro text for the reader.\n\nFixed in Python 3.8."
    # a paragraph that starts with a domain role is prose, a field list is not
    assert clean_rst(":c:func:`PyFoo` returns a new reference.\n\n:Author: Me\n") == (
        "", "PyFoo returns a new reference.")


HTML = """<?xml version="1.0" encoding="UTF-8"?><html><head><title>2.2. Concepts</title><style>p{}</style>
<script>var x;</script></head>
<body><div class="navheader"><table><tr><td>Prev</td></tr></table></div>
<nav>Home | Up</nav><ul class="docnav"><li>Next</li></ul>
<div class="sect1"><h2 class="title">2.2. Concepts</h2>
<p>PostgreSQL is a <em>relational database</em>
   management system (<acronym>RDBMS</acronym>).</p>
<pre class="programlisting">SELECT * FROM t;</pre>
<div class="para">Each table is a named collection of <code>rows</code>.<br/>A second line &amp; more.</div>
<table><tr><td>cell text</td></tr></table>
<ul><li>first item</li><li>second item</li></ul>
<div class="programlisting">x = 1</div>
</div><footer>Copyright footer</footer><div class="navfooter">Next page</div></body></html>"""


def test_clean_html_exact():
    title, text = clean_html(HTML)
    assert title == "2.2. Concepts"
    assert text == ("2.2. Concepts\n\nPostgreSQL is a relational database management system (RDBMS).\n\n"
                    "Each table is a named collection of rows.\n\nA second line & more.\n\nfirst item\n\nsecond item")


POD = """=head1 NAME

perlfoo - Foo things in Perl

=head1 DESCRIPTION

This is B<bold> and C<code> with L<perlfunc/open> and L<the manual|perlintro>.
It continues E<lt>hereE<gt>.

    my $x = 1;   # verbatim dropped

=over 4

=item *

Bullet text here.

=back

=begin html

<p>dropped</p>

=end html

=cut

sub code { }

=pod

Back in pod.
"""


def test_clean_pod_exact():
    title, text = clean_pod(POD)
    assert title == "perlfoo - Foo things in Perl"
    assert text.split("\n\n") == ["NAME", "perlfoo - Foo things in Perl", "DESCRIPTION",
                                  "This is bold and code with perlfunc open and the manual. It continues <here>.",
                                  "Bullet text here.", "Back in pod."]


# --- reading a .deb ---------------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["xz", "gz", ""])
def test_deb_extraction_version_and_licence(tmp_path, compression):
    deb = make_deb(tmp_path / "pkg_1.2-3_all.deb", "pkg", "1.2-3",
                   {"usr/share/doc/pkg/a.rst": "Alpha text.", "usr/share/doc/pkg/sub/b.rst": "Beta",
                    "usr/share/doc/pkg/c.html": "<p>c</p>"}, copyright=dep5("GPL-2"), compression=compression)
    control = read_control(deb)
    assert (control["Package"], control["Version"], control["Description"]) == ("pkg", "1.2-3", "test\ntiny")
    files = dict(read_deb_files(deb, lambda name: name.endswith(".rst")))
    assert files == {"usr/share/doc/pkg/a.rst": b"Alpha text.", "usr/share/doc/pkg/sub/b.rst": b"Beta"}
    source = PackageSource("x", "pkg", ("usr/share/doc/pkg/*.rst",), (), "rst", "GPL-2")
    copyright = dict(read_deb_files(deb, lambda n: n == "usr/share/doc/pkg/copyright"))
    assert licence_of(copyright["usr/share/doc/pkg/copyright"].decode(), source) == "GPL-2"


def test_licence_from_free_form_copyright():
    source = PackageSource("x", "pkg", ("*",), (), "rst", "PSF-2.0", licence_marker="PSF LICENSE VERSION 2")
    assert licence_of("Some text.\n\nPSF License Version 2\n\n1. This LICENSE...", source) == "PSF-2.0"
    assert licence_of("Some other licence.", source) == "unknown (see usr/share/doc/pkg/copyright)"
    assert licence_of(None, source) == "unknown (no usr/share/doc/pkg/copyright)"
    assert licence_of(dep5("GPL-2.0+ or CC-BY-SA-3.0"), source) == "GPL-2.0+ or CC-BY-SA-3.0"


def test_member_globs():
    kernel, postgres = member_filter(PACKAGE_SOURCES["kernel-docs"]), member_filter(PACKAGE_SOURCES["postgres-docs"])
    doc = "usr/share/doc/linux-doc-6.1/Documentation/"
    assert kernel(doc + "process/coding-style.rst.gz") and kernel(doc + "memory-barriers.txt.gz")
    assert kernel(doc + "a/b/c/d.rst.gz")
    assert not kernel(doc + "translations/zh_CN/index.rst.gz")
    assert not kernel(doc + "devicetree/bindings/spi/spi-sprd.txt.gz")
    assert not kernel(doc + "netlink/specs/ethtool.yaml.gz") and not kernel("usr/share/doc/x/Documentation/a.rst.gz")
    assert postgres("usr/share/doc/postgresql-doc-15/html/sql-select.html")
    assert not postgres("usr/share/doc/postgresql-doc-15/html/sub/page.html")


def test_corrupt_and_truncated_debs_are_one_line_errors(tmp_path, capsys):
    good = make_deb(tmp_path / "debian-handbook_1_all.deb", "debian-handbook", "1",
                    {"usr/share/doc/debian-handbook/html/en-US/a.html": "<p>x</p>"})
    not_ar = tmp_path / "not_ar.deb"
    not_ar.write_bytes(b"PK\x03\x04 a zip file")
    truncated = tmp_path / "truncated.deb"
    truncated.write_bytes(good.read_bytes()[:-200])
    bad_xz = tmp_path / "bad_xz.deb"
    bad_xz.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", b"\xfd7zXZ\x00garbage")]))
    for deb, message in ((not_ar, "not a Debian package (no ar archive header)"),
                         (truncated, "truncated .deb (member data.tar.xz needs"),
                         (bad_xz, "corrupt .deb (control archive:")):
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_control(deb)
        assert main(["prepare-data", "--source", "debian-handbook", "--deb", str(deb), "--out",
                     str(tmp_path / "ds"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"dslm prepare-data: error: {deb}: ") and message in err[0]
        assert not (tmp_path / "ds").exists()


def test_zstd_data_without_zstandard_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)       # import zstandard -> ImportError
    deb = tmp_path / "p_1_all.deb"
    control = _tar({"control": b"Package: p\nVersion: 1\n"}, "xz")
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", control), ("data.tar.zst", b"\x28\xb5\x2f\xfd")]))
    assert read_control(deb)["Version"] == "1"
    with pytest.raises(UsageError, match=r"data.tar.zst is zstd-compressed, which needs the 'zstandard' module"):
        list(read_deb_files(deb, lambda name: True))


# --- finding / downloading the .deb ----------------------------------------------------------------

def _fake_apt_get(bin_dir, script: str):
    """An ``apt-get`` on a PATH that holds nothing else: a Python script (``argv`` is sys.argv)."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "apt-get"
    path.write_text(f"#!{sys.executable}\nimport shutil, sys\nargv = sys.argv\n" + script)
    path.chmod(0o755)


def test_missing_apt_get_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code = main(["prepare-data", "--source", "python-docs", "--package-cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "ds"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (f"dslm prepare-data: error: python3.11-doc: no .deb in {tmp_path / 'cache'} and no apt-get "
                      "to download it; download python3.11-doc's .deb by hand "
                      f"(https://packages.debian.org/python3.11-doc) into {tmp_path / 'cache'} or pass it with --deb FILE")
    assert not (tmp_path / "ds").exists()


def test_failed_download_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    _fake_apt_get(tmp_path / "bin", "print('W: some warning', file=sys.stderr)\n"
                                    "print('E: Unable to locate package x', file=sys.stderr)\nsys.exit(100)\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    code = main(["prepare-data", "--source", "postgres-docs", "--package-cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "ds"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("dslm prepare-data: error: postgresql-doc-15: apt-get download failed "
                             "(E: Unable to locate package x); download postgresql-doc-15's .deb by hand")


def test_download_into_cache_then_cache_and_given_deb(tmp_path, monkeypatch, capsys):
    source = PACKAGE_SOURCES["debian-handbook"]
    built = make_deb(tmp_path / "built.deb", "debian-handbook", "11.1", {})
    _fake_apt_get(tmp_path / "bin", "assert argv[1:] == ['download', 'debian-handbook']\n"
                                    f"shutil.copy({str(built)!r}, 'debian-handbook_11.1_all.deb')\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    cache = tmp_path / "cache"
    found = locate_debs([source], cache)
    assert found == {"debian-handbook": cache / "debian-handbook_11.1_all.deb"} and found["debian-handbook"].is_file()
    assert "debian-handbook: downloading with 'apt-get download debian-handbook' into" in capsys.readouterr().out
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))     # now found in the cache: no download
    assert locate_debs([source], cache) == found
    assert locate_debs([source], cache, given=[built]) == {"debian-handbook": built}
    (cache / "debian-handbook_11.2_all.deb").write_bytes(b"")
    with pytest.raises(UsageError, match="several .deb files of debian-handbook"):
        locate_debs([source], cache)
    with pytest.raises(UsageError, match=r"^deb .*built.deb: holds package debian-handbook, which no chosen source reads"):
        locate_debs([PACKAGE_SOURCES["python-docs"]], tmp_path / "cache2", given=[built], download=None)


# --- documents kept and dropped ---------------------------------------------------------------------

def _rst_doc(title: str, body: str) -> str:
    return f"{title}\n{'=' * len(title)}\n\n{body}\n"


def test_drop_counts_and_duplicates(tmp_path):
    root = "usr/share/doc/linux-doc-6.1/Documentation/"
    code = "\n".join(f"    reg_{i} = readl(base + 0x{i:02x});" for i in range(60))
    kernel = make_deb(tmp_path / "k.deb", "linux-doc-6.1", "6.1.1-1", {
        root + "a.rst.gz": _rst_doc("Alpha", prose(12, 1)),
        root + "b.rst.gz": _rst_doc("Alpha", prose(12, 1)) + "\n.. a comment\n",  # same text as a: duplicate
        root + "c.rst.gz": _rst_doc("Short", "Only a few words here."),      # short
        root + "d.rst.gz": _rst_doc("Code", prose(6, 2) + "\n\nExample::\n\n" + code),   # mostly code
        root + "e.txt.gz": prose(10, 3),
        root + "f.rst.gz": b"\x1f\x8b not really gzip",                      # unreadable
        root + "translations/it/a.rst.gz": _rst_doc("Tradotto", prose(12, 4)),
    }, copyright=dep5("GPL-2"))
    seen: set = set()
    record, documents = read_source(PACKAGE_SOURCES["kernel-docs"], kernel, seen)
    assert [d["title"] for d in documents] == ["Alpha", "e.txt.gz"]
    assert documents[0]["text"] == "Alpha\n\n" + prose(12, 1)
    assert record.as_dict() == {
        "source": "kernel-docs", "package": "linux-doc-6.1", "version": "6.1.1-1", "deb": "k.deb",
        "deb_sha256": hashlib.sha256(kernel.read_bytes()).hexdigest(), "licence": "GPL-2", "files": 6,
        "documents": 2, "words": len(documents[0]["text"].split()) + len(documents[1]["text"].split()),
        "dropped": {"short": 1, "non_prose": 1, "duplicate": 1, "unreadable": 1}}
    # a document already kept from an earlier source is a duplicate across sources too (case and
    # white space do not matter)
    python = make_deb(tmp_path / "p.deb", "python3.11-doc", "3.11.2-6", {
        "usr/share/doc/python3.11/html/_sources/x.rst.txt": _rst_doc("ALPHA", prose(12, 1).upper().replace(". ", ".   ")),
        "usr/share/doc/python3.11/html/_sources/y.rst.txt": _rst_doc("Why", prose(12, 5)),
    }, copyright="Free-form text.\nPYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n")
    record, documents = read_source(PACKAGE_SOURCES["python-docs"], python, seen)
    assert [d["title"] for d in documents] == ["Why"]
    assert (record.licence, record.dropped_duplicate, record.documents) == ("PSF-2.0", 1, 1)
    with pytest.raises(UsageError, match=r"k.deb: holds package linux-doc-6.1, source python-docs reads python3.11-doc"):
        read_source(PACKAGE_SOURCES["python-docs"], kernel, set())


# --- end to end ------------------------------------------------------------------------------------

def _fake_cache(cache):
    """A package cache with a tiny .deb for each of the four sources of 'english'."""
    cache.mkdir()
    kdoc = "usr/share/doc/linux-doc-6.1/Documentation/"
    make_deb(cache / "linux-doc-6.1_6.1.9-1_all.deb", "linux-doc-6.1", "6.1.9-1", {
        kdoc + f"k{i}.rst.gz": _rst_doc(f"Kernel {i}", prose(10 + i, 10 + i)) for i in range(6)}, dep5("GPL-2"))
    make_deb(cache / "python3.11-doc_3.11.2-6_all.deb", "python3.11-doc", "3.11.2-6", {
        "usr/share/doc/python3.11/html/_sources/library/p0.rst.txt": _rst_doc("Py 0", prose(9, 20)),
        "usr/share/doc/python3.11/html/_sources/library/p1.rst.txt": _rst_doc("Py 1", prose(9, 21)),
        "usr/share/doc/python3.11/html/_sources/dup.rst.txt": _rst_doc("Kernel 0", prose(10, 10)),
    }, "Python.\nPYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n")
    html = "<html><head><title>{t}</title></head><body><div class='navheader'>Prev Next</div><p>{p}</p></body></html>"
    make_deb(cache / "postgresql-doc-15_15.2-1_all.deb", "postgresql-doc-15", "15.2-1", {
        f"usr/share/doc/postgresql-doc-15/html/pg{i}.html": html.format(t=f"Pg {i}", p=prose(8, 30 + i))
        for i in range(4)}, dep5("PostgreSQL"))
    make_deb(cache / "debian-handbook_11.1_all.deb", "debian-handbook", "11.1", {
        "usr/share/doc/debian-handbook/html/en-US/h.html": html.format(t="Handbook", p=prose(12, 40)),
        "usr/share/doc/debian-handbook/html/fr-FR/h.html": html.format(t="Manuel", p=prose(12, 41)),
    }, dep5("GPL-2.0+ or CC-BY-SA-3.0"))


def test_prepare_dataset_english_end_to_end(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "english"
    _fake_cache(cache)
    manifest = prepare_dataset(out, source="english", vocab_size=150, split=(8, 2, 2), workers=0,
                               progress=False, package_cache=cache)
    corpus = [json.loads(line) for line in gzip.open(out / "corpus.jsonl.gz", "rt", encoding="utf-8")]
    assert [d["title"] for d in corpus] == [*(f"Kernel {i}" for i in range(6)), "Py 0", "Py 1",
                                            *(f"Pg {i}" for i in range(4)), "Handbook"]
    assert corpus[6]["text"] == "Py 0\n\n" + prose(9, 20)
    assert (corpus[8]["title"], corpus[8]["text"]) == ("Pg 0", prose(8, 30))   # no navigation header
    packages = manifest["source"]["packages"]
    assert [(p["source"], p["package"], p["version"], p["licence"], p["documents"]) for p in packages] == [
        ("kernel-docs", "linux-doc-6.1", "6.1.9-1", "GPL-2", 6),
        ("python-docs", "python3.11-doc", "3.11.2-6", "PSF-2.0", 2),
        ("postgres-docs", "postgresql-doc-15", "15.2-1", "PostgreSQL", 4),
        ("debian-handbook", "debian-handbook", "11.1", "GPL-2.0+ or CC-BY-SA-3.0", 1)]
    assert packages[1]["dropped"] == {"short": 0, "non_prose": 0, "duplicate": 1, "unreadable": 0}
    assert packages[0]["deb_sha256"] == hashlib.sha256((cache / "linux-doc-6.1_6.1.9-1_all.deb").read_bytes()).hexdigest()
    assert manifest["request"]["source"] == "english" and manifest["source"]["kind"] == "packages"
    # counts: documents and tokens per split agree with the token store
    store = TokenStore(out)
    assert manifest["counts"]["documents"] == store.n_docs == 13
    doc_tokens = np.diff(np.asarray(store.sent_offsets)[np.asarray(store.doc_index)])
    ids = split_documents(13, (8, 2, 2))
    assert manifest["split"]["documents"] == {"train": 9, "valid": 2, "test": 2}
    assert manifest["split"]["tokens"] == {k: int(doc_tokens[ids[k]].sum()) for k in ("train", "valid", "test")}
    assert sum(manifest["split"]["tokens"].values()) == manifest["counts"]["tokens"] == store.n_tokens
    out_text = capsys.readouterr().out
    assert "python-docs: python3.11-doc 3.11.2-6 (PSF-2.0): 2 documents" in out_text
    assert "1 duplicate" in out_text
    # a rerun does nothing; without dataset.json the export is reused; --force reads the .debs again
    prepare_dataset(out, source="english", vocab_size=150, split=(8, 2, 2), workers=0, progress=False,
                    package_cache=cache)
    assert "already prepared" in capsys.readouterr().out
    (out / "dataset.json").unlink()
    again = prepare_dataset(out, source="english", vocab_size=150, split=(8, 2, 2), workers=0, progress=False,
                            package_cache=tmp_path / "empty-cache")
    assert "reusing the documents exported earlier" in capsys.readouterr().out
    assert again["source"]["packages"] == packages
    forced = prepare_dataset(out, source="english", vocab_size=150, split=(8, 2, 2), workers=0, progress=False,
                             package_cache=cache, force=True)
    assert "reusing" not in capsys.readouterr().out and forced["counts"]["tokens"] == manifest["counts"]["tokens"]
    assert read_manifest(out)["source"]["packages"] == packages


def test_cli_several_sources_and_default_out(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    _fake_cache(cache)
    monkeypatch.chdir(tmp_path)
    assert main(["prepare-data", "--source", "postgres-docs", "debian-handbook", "--package-cache", str(cache),
                 "--vocab-size", "120", "--workers", "0", "--no-progress"]) == 0
    manifest = read_manifest(tmp_path / "outputs" / "data" / "postgres-docs+debian-handbook")
    assert [p["source"] for p in manifest["source"]["packages"]] == ["postgres-docs", "debian-handbook"]
    assert manifest["counts"]["documents"] == 5
    assert _default_out(["english"]) == os.path.join("outputs", "data", "english")
    assert _default_out(["corpus.jsonl"]) == os.path.join("outputs", "data", "corpus")
    capsys.readouterr()
    for argv, message in ((["--source", "kernel-docs", "embedded"], "--source embedded: not a Debian package source"),
                          (["--source", "embedded", "--deb", str(cache / "debian-handbook_11.1_all.deb")],
                           "--deb applies only to Debian package sources")):
        assert main(["prepare-data", *argv, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
