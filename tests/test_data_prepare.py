"""prepare-data: round trip, manifest and store validation, reruns, bad input (exit 2, one line)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dslm.cli import main
from dslm.data import PretrainingDataset, load_tokenizer, prepare_dataset
from dslm.data.manifest import MANIFEST_FILE, read_manifest
from dslm.data.sentences import split_sentences
from dslm.data.store import TokenStore, TokenStoreWriter
from dslm.errors import UsageError
from test_data_common import make_documents, prepare_small, write_jsonl


def _cli_error(capsys, argv) -> str:
    """Run the CLI, expect exit 2 and exactly one stderr line; return that line."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dslm prepare-data: error: ")
    return lines[0]


def test_round_trip_text_store_text(tmp_path):
    docs = make_documents(40, seed=1)
    out = prepare_small(tmp_path, docs, workers=2)
    store, tok = TokenStore(out), load_tokenizer(out)
    assert store.n_docs == len(docs)
    for d, text in enumerate(docs):
        sentences = store.document(d)
        expected = split_sentences(text)
        assert len(sentences) == len(expected)
        for ids, sentence in zip(sentences, expected):
            # WordPiece decoding re-spaces punctuation; the characters must come back exactly (lower case)
            assert tok.decode(ids).replace(" ", "") == sentence.lower().replace(" ", "")
    manifest = read_manifest(out)
    assert manifest["counts"]["documents"] == len(docs)
    assert manifest["counts"]["sentences"] == sum(len(split_sentences(t)) for t in docs)
    assert manifest["counts"]["tokens"] == store.n_tokens == int(store.sent_offsets[-1])
    assert sum(manifest["split"]["documents"].values()) == len(docs)
    assert manifest["token_dtype"] == "uint16" and store.dtype == np.uint16


def test_workers_do_not_change_the_store(tmp_path):
    one = prepare_small(tmp_path, make_documents(60, seed=2), workers=0)
    two = tmp_path / "two"
    m2 = prepare_dataset(two, source=str(tmp_path / "corpus.jsonl"), vocab=one / "vocab.txt", workers=2, progress=False)
    m1 = read_manifest(one)
    assert m1["files"]["tokens.bin"]["sha256"] == m2["files"]["tokens.bin"]["sha256"]
    assert m1["files"]["tokens.idx"]["sha256"] == m2["files"]["tokens.idx"]["sha256"]


def test_txt_folder_source(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("First doc line one.\nLine two here.\n\n\nSecond doc. It has two.\n", encoding="utf-8")
    (folder / "b.txt").write_text("Third doc alone.\n", encoding="utf-8")
    (folder / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    manifest = prepare_dataset(tmp_path / "ds", source=str(folder), vocab_size=100, workers=0, progress=False)
    assert manifest["counts"]["documents"] == 3
    assert manifest["counts"]["sentences"] == 5
    assert [len(TokenStore(tmp_path / "ds").document(d)) for d in range(3)] == [2, 2, 1]


def test_rerun_is_a_noop_and_other_settings_are_refused(tmp_path, capsys):
    out = prepare_small(tmp_path, make_documents(20))
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare_dataset(out, source=str(tmp_path / "corpus.jsonl"), vocab_size=200, workers=0, progress=False)
    assert "already prepared" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    line = _cli_error(capsys, ["prepare-data", "--source", str(tmp_path / "corpus.jsonl"), "--out", str(out),
                               "--vocab-size", "300", "--no-progress"])
    assert "--force" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # the dataset there is untouched


def test_interrupted_run_leaves_nothing_and_rerun_restarts(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "corpus.jsonl", make_documents(300))
    out = tmp_path / "ds"
    calls = []

    def interrupted_add(self, *args):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(TokenStoreWriter, "add", interrupted_add)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(out, source=str(tmp_path / "corpus.jsonl"), vocab_size=200, workers=0, progress=False)
    assert calls and not out.exists()
    monkeypatch.undo()
    # a directory left by a crash (stage files, no manifest) is started over
    out.mkdir()
    (out / "tokens.bin").write_bytes(b"stale")
    (out / "vocab.txt.tmp").write_bytes(b"stale")
    manifest = prepare_dataset(out, source=str(tmp_path / "corpus.jsonl"), vocab_size=200, workers=0, progress=False)
    assert manifest["counts"]["documents"] == 300
    assert not list(out.glob("*.tmp"))
    assert TokenStore(out).n_tokens == manifest["counts"]["tokens"]


def test_bad_lines_are_counted_and_strict_stops(tmp_path, capsys):
    corpus = tmp_path / "bad.jsonl"
    good = [json.dumps({"text": t}).encode() for t in make_documents(5)]
    corpus.write_bytes(b"\n".join([good[0], b"{not json", good[1], b'{"title": "no text"}', good[2],
                                   b'{"text": "caf\xe9 bytes"}', good[3], b'{"text": 7}', good[4]]) + b"\n")
    manifest = prepare_dataset(tmp_path / "ds", source=str(corpus), vocab_size=100, workers=0, progress=False)
    assert manifest["counts"]["documents"] == 5
    assert manifest["counts"]["skipped_lines"] == {"lines not JSON": 1, "lines without a 'text' string": 2,
                                                   "lines not UTF-8": 1}
    summary = capsys.readouterr().out
    assert "skipped 4 bad lines" in summary and f"{corpus}:2" in summary
    line = _cli_error(capsys, ["prepare-data", "--source", str(corpus), "--out", str(tmp_path / "strict"),
                               "--strict", "--vocab-size", "100", "--no-progress"])
    assert f"{corpus}:2: lines not JSON" in line
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("content, problem", [
    (b"", "no documents"),
    (b"\n   \n", "no documents"),
    (b'{"text": ""}\n{"oops": 1}\n', "no documents"),
])
def test_empty_corpus_is_an_error_with_no_output(tmp_path, capsys, content, problem):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_bytes(content)
    line = _cli_error(capsys, ["prepare-data", "--source", str(corpus), "--out", str(tmp_path / "ds"), "--no-progress"])
    assert problem in line and str(corpus) in line
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("vocab, problem", [
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n", "lacks the special token(s) [MASK]"),
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nthe\n", "appears twice"),
    ("", "vocabulary is empty"),
    (b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n\xff\xfe\n", "not UTF-8 (invalid byte at line 6)"),
])
def test_bad_vocab_is_an_error_with_no_output(tmp_path, capsys, vocab, problem):
    path = tmp_path / "vocab.txt"
    path.write_bytes(vocab if isinstance(vocab, bytes) else vocab.encode())
    write_jsonl(tmp_path / "c.jsonl", make_documents(3))
    line = _cli_error(capsys, ["prepare-data", "--source", str(tmp_path / "c.jsonl"), "--vocab", str(path),
                               "--out", str(tmp_path / "ds"), "--no-progress"])
    assert problem in line and str(path) in line
    assert not (tmp_path / "ds").exists()


def test_given_vocab_is_used_as_is(tmp_path):
    first = prepare_small(tmp_path, make_documents(30))
    other = tmp_path / "other"
    manifest = prepare_dataset(other, source=str(tmp_path / "corpus.jsonl"), vocab=first / "vocab.txt",
                               workers=0, progress=False)
    assert (other / "vocab.txt").read_bytes() == (first / "vocab.txt").read_bytes()
    assert manifest["files"]["tokens.bin"]["sha256"] == read_manifest(first)["files"]["tokens.bin"]["sha256"]
    assert manifest["vocab_origin"] == str((first / "vocab.txt").resolve())


def _corrupt(path, how):
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:-4], "foreign": b"GARBAGE!" + data[8:], "append": data + b"\0\0"}[how])


@pytest.mark.parametrize("name, how, problem", [
    ("tokens.bin", "truncate", "truncated or replaced"),
    ("tokens.idx", "truncate", "truncated or replaced"),
    ("tokens.idx", "foreign", "SHA-256 differs"),
])
def test_corrupt_store_files_are_named(tmp_path, capsys, name, how, problem):
    out = prepare_small(tmp_path, make_documents(20))
    _corrupt(out / name, how)
    if how == "foreign":  # same size: caught by the header check (and the checksum)
        with pytest.raises(UsageError, match="bad magic number"):
            TokenStore(out)
    with pytest.raises(UsageError) as err:
        PretrainingDataset(out, seq_len=32)
    assert str(out / name) in str(err.value) and ("bad magic" in str(err.value) or "truncated" in str(err.value))
    # a rerun checks sizes and checksums before calling the directory done
    line = _cli_error(capsys, ["prepare-data", "--source", str(tmp_path / "corpus.jsonl"), "--out", str(out),
                               "--vocab-size", "200", "--workers", "0", "--no-progress"])
    assert problem in line and name in line and "--force" in line
    assert (out / MANIFEST_FILE).exists() and (out / name).exists()  # the user's files are left alone


def test_store_header_checks_without_manifest(tmp_path):
    out = prepare_small(tmp_path, make_documents(20))
    (out / "tokens.bin").write_bytes((out / "tokens.bin").read_bytes() + b"\0\0")
    with pytest.raises(UsageError, match=r"tokens\.bin: truncated or corrupt"):
        TokenStore(out)
    data = bytearray((out / "tokens.idx").read_bytes())
    data[8] = 9  # version field
    (out / "tokens.idx").write_bytes(bytes(data))
    with pytest.raises(UsageError, match="token index version 9"):
        TokenStore(out)


def test_incompatible_manifest_version(tmp_path, capsys):
    out = prepare_small(tmp_path, make_documents(20))
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["version"] = 2
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="dataset format version 2"):
        PretrainingDataset(out)
    line = _cli_error(capsys, ["prepare-data", "--source", str(tmp_path / "corpus.jsonl"), "--out", str(out),
                               "--vocab-size", "200", "--no-progress"])
    assert "dataset format version 2" in line and MANIFEST_FILE in line
    assert main(["prepare-data", "--source", str(tmp_path / "corpus.jsonl"), "--out", str(out), "--vocab-size",
                 "200", "--workers", "0", "--no-progress", "--force"]) == 0
    assert read_manifest(out)["version"] == 1


@pytest.mark.parametrize("argv, problem", [
    (["--source", "no/such/path"], "no such file or folder"),
    (["--split", "980,10"], "--split 980,10"),
    (["--vocab-size", "3"], "--vocab-size 3"),
])
def test_cli_usage_errors(tmp_path, capsys, argv, problem):
    line = _cli_error(capsys, ["prepare-data", "--out", str(tmp_path / "ds"), *argv])
    assert problem in line
    assert not (tmp_path / "ds").exists()


def test_unsupported_file_type(tmp_path, capsys):
    (tmp_path / "c.csv").write_text("a,b\n")
    line = _cli_error(capsys, ["prepare-data", "--source", str(tmp_path / "c.csv"), "--out", str(tmp_path / "ds")])
    assert "unsupported file type" in line


def test_embedded_corpus_is_shipped_and_readable():
    from dslm.data.sources import DocumentReader, SkipLog, resolve_source

    source = resolve_source("embedded")
    reader = DocumentReader(source.files, SkipLog(strict=True))
    docs = list(reader)
    assert len(docs) > 1000 and reader.bytes_read > 1_500_000
    assert os.path.getsize(source.files[0]) < 3_000_000
    assert sum(len(split_sentences(d)) for d in docs) > 15_000
