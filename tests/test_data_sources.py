"""Sources: TFDS and HF Wikipedia readers on local records (only the download is faked), the
missing-library error, and the sentence splitter."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from dslm.cli import main
from dslm.data import prepare_dataset
from dslm.data.sentences import split_sentences
from dslm.data.store import TokenStore
from test_data_common import make_documents

ARTICLES = [("Alpha", "Alpha is first. It leads the list."), ("Beta", "Beta follows.\nIt is second. Really!"),
            ("Broken", None), ("Gamma", "Gamma ends it. The end.")] + [
    (f"Extra {i}", text) for i, text in enumerate(make_documents(20, seed=5))]


class FakeTfdsBuilder:
    """Stands in for the TFDS builder (download and prepare): serves the Wikipedia records of a local
    file exactly as ``tfds.as_numpy`` yields them, ``{"title": bytes, "text": bytes}``."""

    def __init__(self, path):
        self.path = path
        self.prepared = False
        self.info = types.SimpleNamespace(splits={"train": types.SimpleNamespace(num_examples=len(ARTICLES))})

    def download_and_prepare(self):
        self.prepared = True

    def as_dataset(self, split, shuffle_files):
        assert self.prepared and split == "train" and shuffle_files is False
        for line in self.path.read_bytes().splitlines():
            record = json.loads(line)
            yield {"title": record["title"].encode(), "text": record["text"].encode("utf-8", "surrogateescape")}


@pytest.fixture
def wiki_file(tmp_path):
    """The articles as a local file; the 'Broken' one has text that is not UTF-8."""
    path = tmp_path / "wiki.jsonl"
    lines = [json.dumps({"title": t, "text": x if x is not None else "bad \udcff bytes"}) for t, x in ARTICLES]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_tfds_source(tmp_path, monkeypatch, wiki_file, capsys):
    calls = {}

    def builder(name, data_dir=None, try_gcs=False):
        calls.update(name=name, data_dir=data_dir, try_gcs=try_gcs)
        return FakeTfdsBuilder(wiki_file)

    fake = types.SimpleNamespace(builder=builder, as_numpy=lambda ds: ds)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    out = tmp_path / "ds"
    manifest = prepare_dataset(out, source="tfds", vocab_size=150, workers=0, progress=False, tfds_data_dir="/x")
    assert calls == {"name": "wikipedia/20230601.en", "data_dir": "/x", "try_gcs": True}
    exported = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    good = [(t, x) for t, x in ARTICLES if x is not None]
    assert [(d["title"], d["text"]) for d in exported] == good
    assert manifest["counts"]["documents"] == len(good)
    assert manifest["source"]["name"] == "tfds:wikipedia/20230601.en"
    assert "1 records without UTF-8 text (first at tfds:wikipedia/20230601.en record 3)" in capsys.readouterr().out
    store = TokenStore(out)
    assert [len(store.document(d)) for d in range(3)] == [2, 3, 2]


def test_hf_source(tmp_path, monkeypatch, wiki_file):
    rows = [json.loads(line) for line in wiki_file.read_text().splitlines()]
    calls = {}

    def load_dataset(path, name, split, streaming):
        """Stands in for the Hub download: yields the parquet rows' columns id, url, title, text."""
        calls.update(path=path, name=name, split=split, streaming=streaming)
        for i, row in enumerate(rows):
            text = row["text"] if "\udcff" not in row["text"] else None  # a null cell
            yield {"id": str(i), "url": f"https://en.wikipedia.org/wiki?curid={i}", "title": row["title"], "text": text}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = tmp_path / "ds"
    manifest = prepare_dataset(out, source="hf", vocab_size=150, workers=0, progress=False)
    assert calls == {"path": "wikimedia/wikipedia", "name": "20231101.en", "split": "train", "streaming": True}
    assert manifest["counts"]["documents"] == len(ARTICLES) - 1
    first = json.loads((out / "corpus.jsonl").read_text().splitlines()[0])
    assert first == {"title": "Alpha", "text": "Alpha is first. It leads the list."}
    # a rerun reuses the export and the finished dataset
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=None))
    assert prepare_dataset(out, source="hf", vocab_size=150, workers=0, progress=False) == manifest


@pytest.mark.parametrize("source, module", [("tfds", "tensorflow_datasets"), ("hf", "datasets")])
def test_missing_library_is_a_one_line_error(tmp_path, monkeypatch, capsys, source, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails
    assert main(["prepare-data", "--source", source, "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"needs the '{module}' package" in err[0]
    assert not (tmp_path / "ds").exists()


def test_sentence_splitter():
    text = ('Dr. Smith met J. S. Bach in 1720. "Really?" she asked. It was e.g. fine! Yes.\n'
            "A new paragraph without a stop\n\n  Version 3.11 is here. 42 is a number.")
    assert split_sentences(text) == [
        "Dr. Smith met J. S. Bach in 1720.", '"Really?" she asked.', "It was e.g. fine!", "Yes.",
        "A new paragraph without a stop", "Version 3.11 is here.", "42 is a number."]
    assert split_sentences("lower case. does not split") == ["lower case. does not split"]
    assert split_sentences("") == [] and split_sentences("\n \n") == []


def test_tfds_skips_are_in_the_manifest(tmp_path, monkeypatch, wiki_file):
    fake = types.SimpleNamespace(builder=lambda name, data_dir=None, try_gcs=False: FakeTfdsBuilder(wiki_file),
                                 as_numpy=lambda ds: ds)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    manifest = prepare_dataset(tmp_path / "ds", source="tfds", vocab_size=150, workers=0, progress=False)
    tokens = TokenStore(tmp_path / "ds").tokens
    assert manifest["counts"]["skipped_lines"] == {"records without UTF-8 text": 1}
    assert manifest["counts"]["tokens"] == len(tokens) and np.asarray(tokens).max() < manifest["vocab_size"] <= 150
