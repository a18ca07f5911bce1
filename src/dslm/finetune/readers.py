"""Readers for the finetuning data sets, from the files users have on disk or from the HF hub.

* GLUE's distributed TSV files: MNLI ``train.tsv`` / ``dev_matched.tsv`` / ``dev_mismatched.tsv``
  (text columns ``sentence1``, ``sentence2``, label column ``gold_label`` with values entailment /
  neutral / contradiction) and QQP ``train.tsv`` / ``dev.tsv`` (``question1``, ``question2``,
  ``is_duplicate`` 0/1, ``id``). Columns are found by their header names. A line is split on tabs
  only: GLUE's files contain unbalanced quote characters inside sentences, which a CSV reader with
  quoting would glue onto the following lines.
* The RACE distribution's tree ``<root>/<split>/{middle,high}/*.txt``, each file one JSON object
  ``{"article", "questions", "options", "answers", "id"}`` with one options list (4 strings) and one
  answer letter (A-D) per question.
* HF datasets ``nyu-mll/glue`` (configs ``mnli``, ``qqp``) and ``ehovy/race`` (``all``, ``middle``,
  ``high``), imported lazily.

A row that cannot be used (too few columns, unknown label, not UTF-8, a RACE question without four
options, ...) is counted in the :class:`ReadReport` with its reason and the first place it was seen;
it is never dropped silently and never stops the run. A missing or unreadable file, or a header
without the needed columns, is a :class:`~dslm.errors.UsageError` (one line, exit status 2).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dslm.errors import ConfigError, UsageError

MNLI_LABELS = ("entailment", "neutral", "contradiction")   # the HF glue/mnli ids 0, 1, 2
QQP_LABELS = ("not_duplicate", "duplicate")                 # is_duplicate 0 / 1
RACE_LETTERS = "ABCD"


def _is_answer_letter(ans) -> bool:
    """Exactly one of A B C D (surrounding spaces allowed); not a substring test: "AB" is malformed."""
    return isinstance(ans, str) and len(ans.strip()) == 1 and ans.strip() in RACE_LETTERS
RACE_LEVELS = ("middle", "high")
NUM_CHOICES = 4

GLUE_FILES = {
    "mnli": {"train": "train.tsv", "dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
    "qqp": {"train": "train.tsv", "dev": "dev.tsv"},
}
HF_SPLITS = {
    "mnli": {"train": "train", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"},
    "qqp": {"train": "train", "dev": "validation"},
    "race": {"train": "train", "dev": "validation", "test": "test"},
}


@dataclass
class ReadReport:
    """What a reader saw: rows read, rows kept, and the malformed ones by reason (with the first
    place each reason was seen, ``file:line``)."""

    source: str
    rows: int = 0
    kept: int = 0
    malformed: Counter = field(default_factory=Counter)
    first: dict = field(default_factory=dict)

    def bad(self, reason: str, where: str) -> None:
        self.malformed[reason] += 1
        self.first.setdefault(reason, where)

    @property
    def n_malformed(self) -> int:
        return sum(self.malformed.values())

    def summary(self) -> str:
        text = f"{self.source}: {self.kept} examples"
        if self.malformed:
            parts = [f"{n} {reason} (first at {self.first[reason]})" for reason, n in self.malformed.most_common()]
            text += f", {self.n_malformed} malformed rows skipped: " + "; ".join(parts)
        return text

    def to_dict(self) -> dict:
        return {"source": self.source, "rows": self.rows, "kept": self.kept,
                "malformed": dict(self.malformed), "first": dict(self.first)}

    @classmethod
    def from_dict(cls, data: dict) -> "ReadReport":
        return cls(data["source"], data["rows"], data["kept"], Counter(data["malformed"]), dict(data["first"]))


@dataclass
class PairData:
    """Sentence pairs, column-wise (fast for 400k rows). ``labels`` are class ids (-1 = none)."""

    text_a: list
    text_b: list
    labels: list
    ids: list
    report: ReadReport
    fingerprint: str = ""   # checksum of the source, for the token cache


@dataclass
class RaceQuestion:
    article: str
    question: str
    options: list       # 4 strings
    label: int          # 0..3
    id: str             # "<file id>-<question number>"
    level: str          # "middle" | "high"


@dataclass
class RaceData:
    questions: list
    report: ReadReport
    fingerprint: str = ""


# ---- files -------------------------------------------------------------------------------------
def file_checksum(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with _open_binary(path) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()


def _open_binary(path: Path):
    if not path.exists():
        raise UsageError(f"{path}: file not found")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected a file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None


def read_glue_tsv(path: str | Path, text_columns: tuple[str, str], label_column: str | None,
                  label_map: dict[str, int], id_column: str | None = None) -> PairData:
    """Rows of a GLUE TSV file as a :class:`PairData`. Columns are located by their header names;
    ``label_column=None`` reads an unlabelled (test) file with labels -1. Malformed rows are skipped
    and counted in the report."""
    path = Path(path)
    report = ReadReport(str(path))
    header, data = _tsv_header_and_body(path)
    index = {name.strip(): i for i, name in enumerate(header)}
    wanted = list(text_columns) + ([label_column] if label_column else []) + ([id_column] if id_column else [])
    missing = [c for c in wanted if c not in index]
    if missing:
        raise UsageError(f"{path}: header lacks the column(s) {', '.join(missing)} "
                         f"(found: {', '.join(header[:12])}); expected GLUE's TSV layout")
    ia, ib = index[text_columns[0]], index[text_columns[1]]
    il = index[label_column] if label_column else None
    iid = index[id_column] if id_column else None
    need = max(index[c] for c in wanted) + 1
    a, b, labels, ids = [], [], [], []
    for n, cols in _tsv_rows(data, path.name, need, report):
        label = -1 if il is None else label_map.get(cols[il].strip())
        if label is None:
            report.bad(f"rows with a label not in {'/'.join(label_map)}", f"{path.name}:{n}")
            continue
        a.append(cols[ia])
        b.append(cols[ib])
        labels.append(label)
        ids.append(cols[iid] if iid is not None else str(n - 2))
    report.kept = len(labels)
    return PairData(a, b, labels, ids, report)


def _tsv_header_and_body(path: Path) -> tuple[list[str], bytes]:
    """The header's column names and the rest of the file as bytes (rows are decoded one by one,
    so one bad row is skipped, not the file)."""
    with _open_binary(path) as f:
        try:
            raw = f.readline()
            header = raw.decode("utf-8-sig").rstrip("\r\n").split("\t")
            data = f.read()
        except UnicodeDecodeError:
            raise UsageError(f"{path}: the header line is not UTF-8 text") from None
        except OSError as e:
            raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw:
        raise UsageError(f"{path}: file is empty (expected a GLUE TSV with a header line)")
    return header, data


def _tsv_rows(data: bytes, name: str, need: int, report: ReadReport):
    """(line number, columns) of every well-formed row: UTF-8, not empty, at least ``need``
    columns; the others are counted in ``report``."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for n, line in enumerate(lines, start=2):
        report.rows += 1
        where = f"{name}:{n}"
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            report.bad("empty lines", where)
            continue
        try:
            cols = line.decode("utf-8").split("\t")
        except UnicodeDecodeError:
            report.bad("lines not UTF-8", where)
            continue
        if len(cols) < need:
            report.bad(f"rows with fewer than {need} columns", where)
            continue
        yield n, cols


def read_mnli_tsv(path: str | Path, labelled: bool = True) -> PairData:
    return read_glue_tsv(path, ("sentence1", "sentence2"), "gold_label" if labelled else None,
                         {name: i for i, name in enumerate(MNLI_LABELS)}, id_column=None)


def read_qqp_tsv(path: str | Path, labelled: bool = True) -> PairData:
    return read_glue_tsv(path, ("question1", "question2"), "is_duplicate" if labelled else None,
                         {"0": 0, "1": 1}, id_column="id")


def glue_split_path(task: str, data: str | Path, split: str) -> Path:
    folder = Path(data)
    if not folder.exists():
        raise ConfigError(f"{{data}} {folder}: no such directory")
    if not folder.is_dir():
        raise ConfigError(f"{{data}} {folder}: expected the {task.upper()} folder of GLUE (with "
                          f"{', '.join(GLUE_FILES[task].values())})")
    return folder / GLUE_FILES[task][split]


def read_glue_split(task: str, data: str | Path, split: str) -> PairData:
    """One split of MNLI/QQP (``task`` ``mnli`` or ``qqp``; ``demo`` reads the MNLI layout) from
    GLUE's folder ``data``, with the file's SHA-256 as the fingerprint."""
    kind = "qqp" if task == "qqp" else "mnli"
    path = glue_split_path(kind, data, split)
    pairs = read_qqp_tsv(path) if kind == "qqp" else read_mnli_tsv(path)
    pairs.fingerprint = file_checksum(path)
    return pairs


# ---- RACE ----------------------------------------------------------------------------------------
def read_race_file(path: Path, level: str, report: ReadReport, out: list) -> None:
    """Append the questions of one RACE file to ``out``; problems go into ``report``."""
    where = f"{path.parent.name}/{path.name}"
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        report.rows += 1
        report.bad(f"unreadable files ({e.strerror or e})", where)
        return
    except (UnicodeDecodeError, ValueError):
        report.rows += 1
        report.bad("files that are not UTF-8 JSON", where)
        return
    keys = ("article", "questions", "options", "answers")
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        report.rows += 1
        report.bad("files without article/questions/options/answers", where)
        return
    article, questions, options, answers = (obj[k] for k in keys)
    file_id = str(obj.get("id", path.name))
    if not isinstance(article, str) or not all(isinstance(x, list) for x in (questions, options, answers)):
        report.rows += 1
        report.bad("files with fields of the wrong type", where)
        return
    n = max(len(questions), len(options), len(answers))
    for i in range(n):
        report.rows += 1
        w = f"{where} question {i + 1}"
        if i >= len(questions) or i >= len(options) or i >= len(answers):
            report.bad("questions without their options or answer", w)
            continue
        q, opts, ans = questions[i], options[i], answers[i]
        if not isinstance(q, str):
            report.bad("questions that are not text", w)
            continue
        if not isinstance(opts, list) or len(opts) != NUM_CHOICES or not all(isinstance(o, str) for o in opts):
            report.bad(f"questions without {NUM_CHOICES} text options", w)
            continue
        if not _is_answer_letter(ans):
            report.bad("answers not one of A B C D", w)
            continue
        out.append(RaceQuestion(article, q, list(opts), RACE_LETTERS.index(ans.strip()), f"{file_id}-{i}", level))


def read_race_tree(root: str | Path, split: str, levels: tuple[str, ...] = RACE_LEVELS) -> RaceData:
    """All questions of ``<root>/<split>/{middle,high}/*.txt`` (files in name order). The fingerprint
    hashes every file's name, size and content."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{{data}} {root}: no such directory (expected the RACE folder with train/dev/test)")
    split_dir = root / split
    if not split_dir.is_dir():
        raise ConfigError(f"{{data}} {root}: no '{split}' folder (expected RACE's train/dev/test/{{middle,high}})")
    report = ReadReport(str(split_dir))
    questions: list[RaceQuestion] = []
    h = hashlib.sha256()
    found = False
    for level in levels:
        d = split_dir / level
        if not d.is_dir():
            continue
        found = True
        for path in sorted(d.glob("*.txt")):
            try:
                data = path.read_bytes()
            except OSError:
                data = b""
            h.update(f"{level}/{path.name}:{len(data)}:".encode())
            h.update(data)
            read_race_file(path, level, report, questions)
    if not found:
        raise UsageError(f"{split_dir}: no {' or '.join(levels)} folder (expected RACE's layout)")
    report.kept = len(questions)
    return RaceData(questions, report, h.hexdigest())


def race_qa(question: str, option: str) -> str:
    """THEORY.md section 4: a question with a blank ("_", or a run of them) has every blank
    filled by the option; otherwise question and option are joined with a space."""
    if "_" in question:
        return re.sub(r"_+", lambda _: option, question)
    return f"{question} {option}"


# ---- HF hub --------------------------------------------------------------------------------------
def _hf_load(path: str, name: str, split: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError("{data} hf needs the 'datasets' package: pip install datasets") from None
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as e:  # noqa: BLE001 - network, missing config, ...: one line for the user
        msg = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise ConfigError(f"{{data}} hf: cannot load {path} ({name}, split {split}): {msg}") from None


def _hf_columns(ds, names: list[str], where: str) -> dict[str, list]:
    """Columns of an HF dataset (column access, fast) or of a list of row dicts."""
    if hasattr(ds, "column_names"):
        missing = [n for n in names if n not in ds.column_names]
        if missing:
            raise UsageError(f"{where}: dataset lacks the column(s) {', '.join(missing)}")
        return {n: list(ds[n]) for n in names}
    rows = list(ds)
    cols = {n: [] for n in names}
    for row in rows:
        for n in names:
            cols[n].append(row.get(n) if isinstance(row, dict) else None)
    return cols


def _fingerprint(ds, cols: dict) -> str:
    fp = getattr(ds, "_fingerprint", None)
    if isinstance(fp, str) and fp:
        return "hf:" + fp
    h = hashlib.sha256()
    for name in sorted(cols):
        h.update(json.dumps(cols[name], ensure_ascii=False, default=str).encode())
    return h.hexdigest()


def read_hf_pairs(task: str, split: str) -> PairData:
    """MNLI / QQP from ``nyu-mll/glue`` (split names as in :data:`HF_SPLITS`)."""
    hf_split = HF_SPLITS[task][split]
    where = f"nyu-mll/glue/{task}:{hf_split}"
    ds = _hf_load("nyu-mll/glue", task, hf_split)
    names = ["premise", "hypothesis"] if task == "mnli" else ["question1", "question2"]
    cols = _hf_columns(ds, names + ["label", "idx"], where)
    n_labels = len(MNLI_LABELS) if task == "mnli" else 2
    report = ReadReport(where)
    a, b, labels, ids = [], [], [], []
    for i, (x, y, label, idx) in enumerate(zip(cols[names[0]], cols[names[1]], cols["label"], cols["idx"])):
        report.rows += 1
        if not isinstance(x, str) or not isinstance(y, str):
            report.bad("rows with a missing text", f"{where} row {i}")
            continue
        if not isinstance(label, int) or not 0 <= label < n_labels:
            report.bad(f"rows with a label not in 0..{n_labels - 1}", f"{where} row {i}")
            continue
        a.append(x)
        b.append(y)
        labels.append(label)
        ids.append(str(idx if idx is not None else i))
    report.kept = len(labels)
    return PairData(a, b, labels, ids, report, _fingerprint(ds, cols))


def read_hf_race(split: str, levels: tuple[str, ...] = RACE_LEVELS) -> RaceData:
    """RACE from ``ehovy/race``: config ``all`` (level from the ``example_id``, e.g. ``high123.txt``)
    or one level's config."""
    name = "all" if set(levels) == set(RACE_LEVELS) else levels[0]
    hf_split = HF_SPLITS["race"][split]
    where = f"ehovy/race/{name}:{hf_split}"
    ds = _hf_load("ehovy/race", name, hf_split)
    cols = _hf_columns(ds, ["example_id", "article", "question", "options", "answer"], where)
    report = ReadReport(where)
    questions = []
    counter: Counter = Counter()
    for i, (eid, article, q, opts, ans) in enumerate(zip(*(cols[k] for k in
                                                           ("example_id", "article", "question", "options", "answer")))):
        report.rows += 1
        w = f"{where} row {i}"
        eid = str(eid)
        level = name if name != "all" else ("middle" if eid.startswith("middle") else
                                            "high" if eid.startswith("high") else None)
        if level is None:
            report.bad("rows whose example_id names no level (middle*/high*)", w)
            continue
        if not isinstance(article, str) or not isinstance(q, str):
            report.bad("rows with a missing text", w)
            continue
        if not isinstance(opts, (list, tuple)) or len(opts) != NUM_CHOICES or not all(isinstance(o, str) for o in opts):
            report.bad(f"questions without {NUM_CHOICES} text options", w)
            continue
        if not _is_answer_letter(ans):
            report.bad("answers not one of A B C D", w)
            continue
        questions.append(RaceQuestion(article, q, list(opts), RACE_LETTERS.index(ans.strip()),
                                      f"{eid}-{counter[eid]}", level))
        counter[eid] += 1
    report.kept = len(questions)
    return RaceData(questions, report, _fingerprint(ds, cols))
