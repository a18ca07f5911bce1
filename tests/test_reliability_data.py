"""Prepared datasets: a failed ``--force`` keeps the old dataset, a missing ``tokenizers`` is a
one-line error (not a hang), and a corrupted store is caught when it is loaded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_data_common import make_documents, prepare_small, write_jsonl

from dslm import files as files_mod
from dslm.cli import main
from dslm.data import PretrainingDataset, prepare_dataset
from dslm.data import manifest as manifest_mod
from dslm.data.manifest import MANIFEST_FILE, VERIFIED_FILE, read_manifest
from dslm.errors import UsageError
from dslm.files import sha256_file


def _snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dslm prepare-data: error: ")
    return lines[0]


# --- prepare-data --force ------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b'{"text": ""}\n{"oops": 1}\n'])
def test_force_with_an_empty_corpus_keeps_the_old_dataset(tmp_path, capsys, content):
    out = prepare_small(tmp_path, make_documents(20))
    before = _snapshot(out)
    assert {"tokens.bin", "tokens.idx", "vocab.txt", MANIFEST_FILE} <= set(before)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(content)
    line = _cli_error(capsys, ["prepare-data", "--source", str(empty), "--out", str(out), "--vocab-size", "200",
                               "--workers", "0", "--no-progress", "--force"])
    assert "no documents" in line and str(empty) in line
    assert _snapshot(out) == before
    assert not (out / ".staging").exists() and not list(out.glob("*.tmp"))
    PretrainingDataset(out, seq_len=32)   # still whole and loadable


def test_force_with_a_bad_vocabulary_keeps_the_old_dataset(tmp_path, capsys):
    out = prepare_small(tmp_path, make_documents(20))
    before = _snapshot(out)
    bad = tmp_path / "bad_vocab.txt"
    bad.write_text("[PAD]\n[UNK]\n")
    line = _cli_error(capsys, ["prepare-data", "--source", str(tmp_path / "corpus.jsonl"), "--out", str(out),
                               "--vocab", str(bad), "--workers", "0", "--no-progress", "--force"])
    assert "lacks the special token" in line
    assert _snapshot(out) == before


def test_force_with_good_input_replaces_the_dataset(tmp_path):
    out = prepare_small(tmp_path, make_documents(20))
    PretrainingDataset(out, seq_len=32)
    assert (out / VERIFIED_FILE).exists()
    write_jsonl(tmp_path / "more.jsonl", make_documents(35, seed=3))
    manifest = prepare_dataset(out, source=str(tmp_path / "more.jsonl"), vocab_size=200, workers=0, progress=False,
                               force=True)
    assert manifest["counts"]["documents"] == 35 and read_manifest(out) == manifest
    assert not (out / ".staging").exists() and not (out / VERIFIED_FILE).exists()
    assert sha256_file(out / "tokens.bin") == manifest["files"]["tokens.bin"]["sha256"]
    PretrainingDataset(out, seq_len=32)


def test_failure_while_publishing_is_seen_as_incomplete(tmp_path, monkeypatch):
    """A crash in the middle of the final moves leaves no manifest: a rerun prepares it again."""
    out = prepare_small(tmp_path, make_documents(20))
    real = os.replace
    calls = []

    def crash_on_second_move(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    from dslm.data import prepare as prepare_mod

    monkeypatch.setattr(prepare_mod.os, "replace", crash_on_second_move)
    with pytest.raises(KeyboardInterrupt):
        prepare_mod._publish(_stage_copy(out), out)
    monkeypatch.undo()
    assert not (out / MANIFEST_FILE).exists()
    manifest = prepare_small(tmp_path, make_documents(20)) and read_manifest(out)
    assert manifest["counts"]["documents"] == 20


def _stage_copy(out):
    stage = out / ".staging"
    stage.mkdir()
    for name in ("vocab.txt", "tokens.bin", "tokens.idx", MANIFEST_FILE):
        (stage / name).write_bytes((out / name).read_bytes())
    return stage


# --- missing tokenizers --------------------------------------------------------------------------

def test_missing_tokenizers_is_a_one_line_error_not_a_hang(tmp_path):
    out = prepare_small(tmp_path, make_documents(10))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["tokenizers"] = None   # as if the data extra were not installed
        from dslm.cli import main
        sys.exit(main(["prepare-data", "--source", {str(tmp_path / "corpus.jsonl")!r},
                       "--vocab", {str(out / "vocab.txt")!r}, "--out", {str(tmp_path / "new")!r},
                       "--workers", "2", "--no-progress"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(__file__), start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # with its worker processes
        proc.communicate()
        pytest.fail("prepare-data without tokenizers hung")
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, stderr[-2000:]
    assert len(lines) == 1 and "pip install 'dslm[data]'" in lines[0]
    assert not (tmp_path / "new").exists()


def test_a_worker_that_cannot_start_fails_the_run(tmp_path, monkeypatch):
    """A failure in a tokenizer worker's setup reaches the parent as that error."""
    from dslm.data import prepare as prepare_mod

    def broken(tokens):
        raise UsageError("worker setup failed")

    prepare_small(tmp_path, make_documents(5))
    monkeypatch.setattr(prepare_mod, "Tokenizer", broken)
    monkeypatch.setattr(prepare_mod, "_worker_error", None)
    write_jsonl(tmp_path / "c2.jsonl", make_documents(10))
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("tokenizer workers need fork")
    with pytest.raises(UsageError, match="worker setup failed"):
        prepare_dataset(tmp_path / "new", source=str(tmp_path / "c2.jsonl"), vocab=tmp_path / "ds" / "vocab.txt",
                        workers=2, progress=False)


# --- verification at load ------------------------------------------------------------------------

def test_same_size_corruption_is_caught_at_load(tmp_path):
    out = prepare_small(tmp_path, make_documents(20))
    PretrainingDataset(out, seq_len=32)
    data = bytearray((out / "tokens.bin").read_bytes())
    data[len(data) // 2] ^= 0x01   # another valid-looking id, same size
    (out / "tokens.bin").write_bytes(bytes(data))
    with pytest.raises(UsageError) as e:
        PretrainingDataset(out, seq_len=32)
    msg = str(e.value)
    assert str(out / "tokens.bin") in msg and "SHA-256" in msg and "prepare-data" in msg and "\n" not in msg


def test_the_stamp_skips_hashing_on_later_loads(tmp_path, monkeypatch):
    out = prepare_small(tmp_path, make_documents(20))
    hashed = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: (hashed.append(p.name), real(p))[1])
    PretrainingDataset(out, seq_len=32)
    assert sorted(hashed) == ["tokens.bin", "tokens.idx", "vocab.txt"]
    stamp = json.loads((out / VERIFIED_FILE).read_text())
    assert stamp["tokens.bin"]["sha256"] == read_manifest(out)["files"]["tokens.bin"]["sha256"]
    hashed.clear()
    PretrainingDataset(out, seq_len=32, split="test")
    PretrainingDataset(out, seq_len=32)
    assert hashed == []
    # a file touched since is hashed again (and, intact, stamped again)
    os.utime(out / "vocab.txt", ns=(1, 1))
    PretrainingDataset(out, seq_len=32)
    assert hashed == ["vocab.txt"]


def test_read_only_dataset_still_loads(tmp_path, monkeypatch):
    out = prepare_small(tmp_path, make_documents(20))
    monkeypatch.setattr(files_mod.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError("read-only")))
    PretrainingDataset(out, seq_len=32)
    assert not (out / VERIFIED_FILE).exists() and not list(out.glob("*.tmp"))


def test_a_store_changed_after_verification_is_caught_when_read(tmp_path):
    """tokens.bin rewritten in place after it was verified, size and modification time kept (the
    verification record still matches): the batch that reads a bad id is one line, not an IndexError."""
    out = prepare_small(tmp_path, make_documents(20))
    PretrainingDataset(out, seq_len=32)                       # verified and recorded
    path = out / "tokens.bin"
    stat = path.stat()
    tokens = np.fromfile(path, dtype="<u2")
    (~tokens).astype("<u2").tofile(path)                      # every id now >= 65535 - 200
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    dataset = PretrainingDataset(out, seq_len=32)
    with pytest.raises(UsageError, match=r"token id \d+ outside the 200-token vocabulary: tokens.bin changed"):
        dataset.get_batch(range(4))


def test_token_ids_outside_the_vocabulary_are_caught(tmp_path):
    """A store whose checksum matches but holds ids past the vocabulary (a bad producer) is refused."""
    out = prepare_small(tmp_path, make_documents(20))
    tokens = np.fromfile(out / "tokens.bin", dtype="<u2")
    tokens[3] = 60000
    tokens.tofile(out / "tokens.bin")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"]["tokens.bin"]["sha256"] = sha256_file(out / "tokens.bin")
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"tokens\.bin: token id 60000 outside the 200-token vocabulary"):
        PretrainingDataset(out, seq_len=32)
