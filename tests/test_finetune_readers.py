"""Finetuning readers: GLUE MNLI/QQP TSV, the RACE tree, HF hub datasets (download faked), malformed rows."""
from __future__ import annotations

import json
import sys
import types

import pytest

from dslm.errors import UsageError
from dslm.finetune import readers as R

MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")


def mnli_row(i, s1, s2, label):
    return "\t".join([str(i), "1", f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2, label, label])


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def test_mnli_labels_columns_by_name_and_quotes(tmp_path):
    rows = [mnli_row(0, 'He said "yes', "He agreed.", "entailment"),       # unbalanced quote stays in the row
            mnli_row(1, "A cat.", '"A dog."', "neutral"),
            mnli_row(2, "It is warm.", "It is cold.", "contradiction")]
    path = write(tmp_path / "dev_matched.tsv", MNLI_HEADER + "\n" + "\n".join(rows) + "\n")
    pairs = R.read_mnli_tsv(path)
    assert pairs.labels == [0, 1, 2]
    assert pairs.text_a == ['He said "yes', "A cat.", "It is warm."]
    assert pairs.text_b == ["He agreed.", '"A dog."', "It is cold."]
    assert pairs.report.kept == 3 and pairs.report.n_malformed == 0
    # columns are found by header name, in any order, CRLF line ends
    text = "gold_label\tsentence2\tsentence1\r\nneutral\tb\ta\r\n"
    pairs = R.read_mnli_tsv(write(tmp_path / "x.tsv", text))
    assert (pairs.text_a, pairs.text_b, pairs.labels) == (["a"], ["b"], [1])


def test_mnli_malformed_rows_counted_with_first_place(tmp_path):
    lines = [MNLI_HEADER.encode(),
             mnli_row(0, "ok", "fine", "entailment").encode(),
             b"1\tshort\trow",                                        # too few columns
             mnli_row(2, "a", "b", "-").encode(),                     # no gold label
             b"",                                                     # empty line
             mnli_row(4, "caf\xe9", "b", "neutral").encode("latin-1"),  # not UTF-8
             mnli_row(5, "a", "b", "Entailed").encode(),              # unknown label
             mnli_row(6, "last", "row", "contradiction").encode()]
    pairs = R.read_mnli_tsv(write(tmp_path / "train.tsv", b"\n".join(lines) + b"\n"))
    rep = pairs.report
    assert pairs.labels == [0, 2] and rep.kept == 2 and rep.rows == 7 and rep.n_malformed == 5
    assert rep.malformed["rows with fewer than 12 columns"] == 1
    assert rep.first["rows with fewer than 12 columns"] == "train.tsv:3"
    assert rep.malformed["rows with a label not in entailment/neutral/contradiction"] == 2
    assert rep.first["rows with a label not in entailment/neutral/contradiction"] == "train.tsv:4"
    assert rep.malformed["lines not UTF-8"] == 1 and rep.malformed["empty lines"] == 1
    summary = rep.summary()
    assert "2 examples" in summary and "5 malformed" in summary and "train.tsv:3" in summary
    assert R.ReadReport.from_dict(json.loads(json.dumps(rep.to_dict()))).summary() == summary


def test_qqp_reader(tmp_path):
    text = ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
            "7\t1\t2\tHow do I learn?\tWhat is learning?\t0\n"
            "8\t3\t4\tWhy \"quote?\tWhy quote?\t1\n"
            "9\t5\t6\tmissing fields\n"
            "10\t7\t8\ta\tb\t2\n")
    pairs = R.read_qqp_tsv(write(tmp_path / "dev.tsv", text))
    assert pairs.ids == ["7", "8"] and pairs.labels == [0, 1]
    assert pairs.text_a[1] == 'Why "quote?'
    assert pairs.report.n_malformed == 2


def test_glue_errors_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="file not found"):
        R.read_mnli_tsv(tmp_path / "nope.tsv")
    (tmp_path / "dir.tsv").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        R.read_mnli_tsv(tmp_path / "dir.tsv")
    with pytest.raises(UsageError, match="lacks the column"):
        R.read_mnli_tsv(write(tmp_path / "bad.tsv", "a\tb\n1\t2\n"))
    with pytest.raises(UsageError, match="empty"):
        R.read_mnli_tsv(write(tmp_path / "empty.tsv", ""))
    with pytest.raises(UsageError, match="no such directory"):
        R.read_glue_split("mnli", tmp_path / "absent", "train")


def race_file(root, split, level, name, obj):
    return write(root / split / level / name, json.dumps(obj) if not isinstance(obj, str) else obj)


def test_race_tree_blank_substitution_and_levels(tmp_path):
    race_file(tmp_path, "dev", "middle", "1.txt", {
        "article": "Tom has a red ball.", "id": "middle1.txt",
        "questions": ["Tom's ball is _ .", "What does Tom have?"],
        "options": [["red", "blue", "green", "pink"], ["a ball", "a cat", "a hat", "a bat"]],
        "answers": ["A", "A"]})
    race_file(tmp_path, "dev", "high", "2.txt", {
        "article": "Long text.", "id": "high2.txt", "questions": ["Fill __ here and _ there."],
        "options": [["x", "y", "z", "w"]], "answers": ["C"]})
    data = R.read_race_tree(tmp_path, "dev")
    qs = data.questions
    assert [q.level for q in qs] == ["middle", "middle", "high"]
    assert [q.label for q in qs] == [0, 0, 2]
    assert qs[0].id == "middle1.txt-0" and qs[2].id == "high2.txt-0"
    assert R.race_qa(qs[0].question, qs[0].options[1]) == "Tom's ball is blue ."
    assert R.race_qa(qs[1].question, qs[1].options[0]) == "What does Tom have? a ball"
    assert R.race_qa(qs[2].question, "z") == "Fill z here and z there."   # each run of "_" is one blank
    assert data.report.n_malformed == 0 and len(data.fingerprint) == 64
    # only one level
    assert [q.level for q in R.read_race_tree(tmp_path, "dev", ("high",)).questions] == ["high"]


def test_race_malformed_accounting(tmp_path):
    good = {"article": "a", "id": "x", "questions": ["q1", "q2", "q3", "q4"],
            "options": [["1", "2", "3", "4"], ["1", "2", "3"], ["1", "2", "3", "4"], ["1", "2", "3", "4"]],
            "answers": ["B", "A", "E", "D"]}
    race_file(tmp_path, "train", "high", "a.txt", good)
    race_file(tmp_path, "train", "high", "b.txt", "{not json")
    race_file(tmp_path, "train", "high", "c.txt", {"article": "a"})
    race_file(tmp_path, "train", "middle", "d.txt", {**good, "answers": ["A"]})
    data = R.read_race_tree(tmp_path, "train")
    rep = data.report
    # a.txt: q1, q4 ok; q2 has 3 options; q3's answer is E. d.txt: q1 ok, 3 questions without an answer
    assert [q.id for q in data.questions] == ["x-0", "x-0", "x-3"]
    assert rep.malformed["questions without 4 text options"] == 1
    assert rep.malformed["answers not one of A B C D"] == 1
    assert rep.malformed["files that are not UTF-8 JSON"] == 1
    assert rep.malformed["files without article/questions/options/answers"] == 1
    assert rep.malformed["questions without their options or answer"] == 3
    assert rep.first["files that are not UTF-8 JSON"] == "high/b.txt"
    assert rep.kept == 3
    with pytest.raises(UsageError, match="no 'test' folder"):
        R.read_race_tree(tmp_path, "test")
    with pytest.raises(UsageError, match="no such directory"):
        R.read_race_tree(tmp_path / "nope", "train")


def test_race_answer_must_be_one_letter(tmp_path):
    """"AB" or "BCD" are substrings of "ABCD" but not answers: counted as malformed, not read as A/B."""
    race_file(tmp_path, "dev", "high", "a.txt", {
        "article": "a", "id": "x", "questions": ["q1", "q2", "q3", "q4"],
        "options": [["1", "2", "3", "4"]] * 4, "answers": ["AB", "BCD", " C ", "ABCD"]})
    data = R.read_race_tree(tmp_path, "dev")
    assert [(q.id, q.label) for q in data.questions] == [("x-2", 2)]
    assert data.report.malformed["answers not one of A B C D"] == 3


class FakeDataset:
    """The two things the readers use of a ``datasets.Dataset``: column names and column access."""

    def __init__(self, rows, fingerprint=None):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else []
        if fingerprint:
            self._fingerprint = fingerprint

    def __getitem__(self, name):
        return [r[name] for r in self.rows]


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []
    tables = {
        ("nyu-mll/glue", "mnli", "validation_matched"): FakeDataset([
            {"premise": "p0", "hypothesis": "h0", "label": 2, "idx": 0},
            {"premise": "p1", "hypothesis": "h1", "label": -1, "idx": 1}], "abc123"),
        ("nyu-mll/glue", "qqp", "validation"): FakeDataset([
            {"question1": "q", "question2": "r", "label": 1, "idx": 5}]),
        ("ehovy/race", "all", "validation"): FakeDataset([
            {"example_id": "high7.txt", "article": "art", "question": "Is it _ ?", "options": ["a", "b", "c", "d"],
             "answer": "D"},
            {"example_id": "middle3.txt", "article": "art2", "question": "Why?", "options": ["a", "b", "c", "d"],
             "answer": "B"},
            {"example_id": "high7.txt", "article": "art", "question": "Q2", "options": ["a", "b"], "answer": "A"}]),
    }

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if (path, name, split) not in tables:
            raise FileNotFoundError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nmore")
        return tables[(path, name, split)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_readers_with_faked_download(fake_hub):
    mnli = R.read_hf_pairs("mnli", "dev_matched")
    assert (mnli.text_a, mnli.labels, mnli.ids) == (["p0"], [2], ["0"])
    assert mnli.report.n_malformed == 1 and mnli.fingerprint == "hf:abc123"
    qqp = R.read_hf_pairs("qqp", "dev")
    assert qqp.labels == [1] and qqp.ids == ["5"] and len(qqp.fingerprint) == 64
    race = R.read_hf_race("dev")
    assert [(q.level, q.label, q.id) for q in race.questions] == [("high", 3, "high7.txt-0"), ("middle", 1, "middle3.txt-0")]
    assert race.report.malformed["questions without 4 text options"] == 1
    assert fake_hub == [("nyu-mll/glue", "mnli", "validation_matched"), ("nyu-mll/glue", "qqp", "validation"),
                        ("ehovy/race", "all", "validation")]
    with pytest.raises(UsageError, match=r"cannot load ehovy/race \(high, split test\): Couldn't reach") as e:
        R.read_hf_race("test", ("high",))
    assert "\n" not in str(e.value)


def test_hf_missing_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)   # import fails
    with pytest.raises(UsageError, match="needs the 'datasets' package"):
        R.read_hf_pairs("mnli", "train")
