"""Fault-injection sweep: how dslm's commands behave on bad input, damaged files and signals.

Each case runs the real ``dslm`` command in a subprocess (its own session, so a signal can go to the
whole process group, and a timeout) inside a fresh folder of a temporary directory, after a
``setup`` that makes the files it needs (a missing, empty, truncated or same-size-corrupted input, a
file where a folder should be, a damaged checkpoint, a pickle that would create a marker file if it
were unpickled, a run cut by kill -9 in the middle of a save...). The outcome is classified from the
exit status, stderr and the case's post-condition:

    clean_error   non-zero exit, stderr's last line ``dslm <command>: error: ...``, no traceback
    worked        a valid but unusual input, exit 0
    stopped       a signal case: exit 128 + signal, the stop message, a whole checkpoint, and
                  ``--load`` continues the run to its end
    traceback     "Traceback" in stderr
    hang          the case ran past its timeout (killed)
    data_lost     the post-condition failed: a file that must survive was changed or deleted, a
                  checkpoint is incomplete, a marker file was created, a half output was left...
    accepted      bad input that should have been refused ended with exit 0
    failed        any other ending: a valid input refused, a non-zero exit without the one-line
                  error, a signal that did not stop the run as documented

A case is clean when its outcome is its expected kind (clean_error, worked or stopped). The dataset
(``dslm prepare-data --source embedded``), a 2-step tiny pretraining run and a 2-step finetuning run
are made once per sweep; cases that damage them work on copies. Subprocesses run with one thread
(``OMP_NUM_THREADS=1``) and without CUDA.

    python benchmarks/fault_sweep.py                  # every case (about 5 minutes on 2 CPU cores)
    python benchmarks/fault_sweep.py --quick          # a subset (under 2 minutes)
    python benchmarks/fault_sweep.py --only 'sigterm' --keep /tmp/sweep   # some cases; keep folders and logs

It prints a table (case, command, expected, outcome) and writes one JSON file
(``benchmarks/results/fault_sweep.json`` by default): counts per outcome, every case, the machine,
the versions and the command.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "src" / "dslm" / "finetune" / "demo"
GOOD = ("clean_error", "worked", "stopped")
OUTCOMES = GOOD + ("traceback", "hang", "data_lost", "accepted", "failed")

# the tiny pretraining run every pretrain case starts from (flag -> value, None for a switch)
TINY = {"--preset": "tiny", "--layers": "1", "--hidden": "32", "--heads": "2", "--seq-len": "32",
        "--global-batch": "4", "--device": "cpu", "--no-progress": None, "--num-workers": "0",
        "--data": "../data", "--out-dir": "run", "--steps": "2"}
# the tiny finetuning run (the shipped demo task; --cache-dir keeps the token cache in the case folder)
FT = {"--task": "demo", "--device": "cpu", "--no-progress": None, "--layers": "2", "--hidden": "32",
      "--heads": "2", "--init": "megatron", "--steps": "2", "--num-workers": "0", "--cache-dir": "cache",
      "--out-dir": "ft"}
FIGS = {"--preset": "small", "--layers": "2", "--hidden": "32", "--heads": "2", "--seq-len": "32", "--batch": "4",
        "--device": "cpu", "--quiet": None, "--data": "../data", "--out": "figs"}
DATA_FILES = ("dataset.json", "tokens.bin", "tokens.idx", "vocab.txt")
CHECKPOINT_FILES = ("model.safetensors", "config.json", "trainer.pt", "rng_rank0.pt", "meta.json")
DROP = object()   # a flag value that removes the flag from a base command


def flags(base: dict, **over) -> list[str]:
    """``base`` with flags replaced (``global_batch=8`` is ``--global-batch 8``, ``None`` a switch,
    DROP removes the flag), as an argument list."""
    merged = dict(base)
    for key, value in over.items():
        merged["--" + key.replace("_", "-")] = value
    argv = []
    for key, value in merged.items():
        if value is DROP:
            continue
        argv += [key] if value is None else [key, str(value)]
    return argv


# ---- files ---------------------------------------------------------------------------------------
def digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (or of ``path`` itself), by path relative to it."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()} if path.is_dir() else {}


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def scramble(path: Path, start: int = 0, length: int = 64, keep_mtime: bool = False) -> None:
    """Invert ``length`` bytes from ``start`` in place: the same size, other content (bit rot);
    ``keep_mtime`` puts the modification time back, as a disk error would leave it."""
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(start)
        chunk = f.read(length)
        f.seek(start)
        f.write(bytes(255 - b for b in chunk))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


class OpensAFile:
    """Pickles as the call ``open(marker, "w")``: whoever unpickles it (``torch.load`` without
    ``weights_only``) creates the marker file, the proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_pickle(path: Path, marker: Path) -> None:
    """A torch file holding an :class:`OpensAFile` beside a tensor."""
    import torch

    torch.save({"state": torch.zeros(2), "payload": OpensAFile(marker)}, path)


def newest_checkpoint(run: Path) -> Path:
    steps = sorted((run / "checkpoints").glob("step_*"))
    if not steps:
        raise FileNotFoundError(f"{run}: no checkpoint")
    return steps[-1]


def checkpoint_problem(step: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is whole: every file there, the JSON
    files parse, model.safetensors' header accounts for its size exactly, and the torch files are
    zip archives whose CRCs match."""
    missing = [name for name in CHECKPOINT_FILES if not (step / name).is_file()]
    if missing:
        return f"{step.name}: {', '.join(missing)} missing"
    try:
        for name in ("meta.json", "config.json"):
            json.loads((step / name).read_text())
        raw = (step / "model.safetensors").read_bytes()
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + size])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        if 8 + size + end != len(raw):
            return f"{step.name}/model.safetensors: {len(raw)} bytes, its header says {8 + size + end}"
        for name in ("trainer.pt", "rng_rank0.pt"):
            with zipfile.ZipFile(step / name) as z:
                if z.testzip() is not None:
                    return f"{step.name}/{name}: CRC mismatch"
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        return f"{step.name}: {e.__class__.__name__}: {e}"
    return None


# ---- running dslm --------------------------------------------------------------------------------
@dataclass
class Result:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def environment() -> dict:
    """The subprocesses' environment: one thread, no GPU, unbuffered output, no DSLM_DEBUG."""
    env = {k: v for k, v in os.environ.items() if k != "DSLM_DEBUG"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


def execute(argv: list[str], cwd: Path, log: Path, timeout: float, interrupt: Interrupt | None = None) -> Result:
    """``dslm argv`` in ``cwd`` as the leader of a new process group, stdout and stderr into
    ``log``.out/.err; ``interrupt`` may signal it while it runs; past ``timeout`` seconds the group
    is killed."""
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    started = time.perf_counter()
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "dslm", *argv], cwd=cwd, stdout=fo, stderr=fe,
                                stdin=subprocess.DEVNULL, env=environment(), start_new_session=True)
        if interrupt is not None:
            interrupt.send(proc, cwd, out, started + timeout)
        try:
            code, timed_out = proc.wait(timeout=max(0.0, started + timeout - time.perf_counter())), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code, timed_out = proc.wait(), True
    return Result(code, out.read_text(errors="replace"), err.read_text(errors="replace"), timed_out,
                  time.perf_counter() - started)


@dataclass(frozen=True)
class Interrupt:
    """Send ``sig`` to the process group (what ``timeout``, Slurm and Kubernetes do) ``delay``
    seconds after ``ready(cwd, stdout so far)`` first holds."""

    sig: int
    ready: Callable[[Path, str], bool]
    delay: float = 0.0

    def send(self, proc: subprocess.Popen, cwd: Path, out: Path, deadline: float) -> None:
        """Poll every 2 ms until ready (then signal), the process ends or the deadline passes."""
        while proc.poll() is None and time.perf_counter() < deadline:
            if self.ready(cwd, out.read_text(errors="replace")):
                time.sleep(self.delay)
                if proc.poll() is None:
                    os.killpg(proc.pid, self.sig)
                return
            time.sleep(0.002)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def classify(expected: str, result: Result, problem: str | None, stop_signal: int | None = None) -> str:
    """The outcome of one case (see the module docstring): hang and traceback first, then bad input
    that was accepted (its output then exists, which is no half output), then data loss."""
    code, line = result.returncode, last_line(result.stderr)
    if result.timed_out:
        return "hang"
    if "Traceback" in result.stderr:
        return "traceback"
    if expected == "clean_error" and code == 0:
        return "accepted"
    if problem:
        return "data_lost"
    if expected == "worked":
        return "worked" if code == 0 else "failed"
    if expected == "stopped":
        stopped = code == 128 + (stop_signal or 0) and "stopped at step" in result.stdout
        return "stopped" if stopped else "failed"
    return "clean_error" if line.startswith("dslm ") and "error" in line else "failed"


# ---- cases ---------------------------------------------------------------------------------------
Check = Callable[[Path, dict], "str | None"]


@dataclass(frozen=True)
class Case:
    """One fault: ``dslm command`` run in a fresh folder after ``setup(folder)``; ``check(folder,
    before)`` (``before``: :func:`digest` of the folder after setup) returns a problem or None."""

    name: str
    command: list[str]
    expected: str                       # clean_error | worked | stopped
    setup: Callable[[Path], None] | None = None
    check: Check | None = None
    interrupt: Interrupt | None = None
    quick: bool = False
    timeout: float = 90.0


def unchanged(*rels: str) -> Check:
    """Post-condition: these files / folders are exactly as setup left them."""
    def check(work: Path, before: dict) -> str | None:
        for rel in rels:
            old = {k[len(rel) + 1:] if k != rel else ".": v for k, v in before.items()
                   if k == rel or k.startswith(rel + "/")}
            new = digest(work / rel)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed:
                return f"{rel} changed ({', '.join(changed[:3])})"
        return None
    return check


def absent(*rels: str) -> Check:
    """Post-condition: none of these exist (a marker file, a half-written output); a folder counts
    as absent when it holds no files."""
    def check(work: Path, before: dict) -> str | None:
        for rel in rels:
            p = work / rel
            if p.is_file() or (p.is_dir() and any(q.is_file() for q in p.rglob("*"))):
                return f"{rel} exists"
        return None
    return check


def present(*rels: str) -> Check:
    """Post-condition: these outputs exist."""
    def check(work: Path, before: dict) -> str | None:
        missing = [rel for rel in rels if not (work / rel).exists()]
        return f"{', '.join(missing)} missing" if missing else None
    return check


def whole_checkpoints(run: str = "run") -> Check:
    """Post-condition: the run has a checkpoint and every ``step_*`` folder is whole."""
    def check(work: Path, before: dict) -> str | None:
        steps = sorted((work / run / "checkpoints").glob("step_*"))
        if not steps:
            return f"{run}: no checkpoint"
        return next((p for p in map(checkpoint_problem, steps) if p), None)
    return check


def resumes(argv: list[str], then: Check | None = None) -> Check:
    """Post-condition: ``dslm argv`` (a ``--load`` of the case's run) ends with exit 0 (then ``then``)."""
    def check(work: Path, before: dict) -> str | None:
        r = execute(argv, work, work.parent / "logs" / f"{work.name}-resume", 240)
        if r.timed_out or r.returncode != 0 or "Traceback" in r.stderr:
            ending = "a timeout" if r.timed_out else f"exit {r.returncode}"
            return f"the --load run ended with {ending}: {last_line(r.stderr)[:150]}"
        return then(work, before) if then else None
    return check


def all_of(*checks: Check) -> Check:
    """Post-condition: every check holds (the first problem is reported)."""
    def check(work: Path, before: dict) -> str | None:
        return next((p for p in (c(work, before) for c in checks) if p), None)
    return check


# setups: small functions over the case folder; ``work.parent`` holds the shared data and runs
def copy(src: str, dst: str) -> Callable[[Path], None]:
    """Copy a shared folder (``data``, ``run``, ``ftrun``, ``ftcache``) into the case folder."""
    def setup(work: Path) -> None:
        shutil.copytree(work.parent / src, work / dst)
    return setup


def chain(*fns: Callable[[Path], None]) -> Callable[[Path], None]:
    """Setups run one after the other."""
    def setup(work: Path) -> None:
        for fn in fns:
            fn(work)
    return setup


def files(**contents: str | bytes) -> Callable[[Path], None]:
    """Write files (``__`` in a name is ``/``, ``_dot_`` is ``.``)."""
    def setup(work: Path) -> None:
        for name, content in contents.items():
            write(work / name.replace("__", "/").replace("_dot_", "."), content)
    return setup


def on(rel: str, damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """Apply ``damage`` to the file ``rel``; ``{ckpt}`` in it is the run's newest checkpoint."""
    def setup(work: Path) -> None:
        path = work / rel
        if "{ckpt}" in rel:
            run = work / rel.split("/{ckpt}")[0]
            path = newest_checkpoint(run) / rel.split("{ckpt}/")[1]
        damage(path)
    return setup


def planted(rel: str) -> Callable[[Path], None]:
    """Replace the file ``rel`` (``{ckpt}`` as in :func:`on`) by a pickle that creates ``PWNED`` in
    the case folder when it is unpickled."""
    def setup(work: Path) -> None:
        on(rel, lambda path: malicious_pickle(path, work / "PWNED"))(work)
    return setup


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def empty(path: Path) -> None:
    path.write_bytes(b"")


def zeros(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def verified_then_rotted(work: Path) -> None:
    """Copy the dataset, let dslm verify it (its record in .verified), then invert every byte of
    tokens.bin in place and put its modification time back: bit rot after the check."""
    shutil.copytree(work.parent / "data", work / "D")
    r = execute(["pretrain", *flags(TINY, data="D", out_dir="verify", steps=1)], work,
                work.parent / "logs" / f"{work.name}-verify", 120)
    if r.returncode != 0:
        raise RuntimeError(f"verifying run failed: {last_line(r.stderr)}")
    scramble(work / "D" / "tokens.bin", length=(work / "D" / "tokens.bin").stat().st_size, keep_mtime=True)


def killed_during_save(work: Path) -> None:
    """A run killed with SIGKILL (the whole group) while it writes a checkpoint (a ``.tmp-step_*``
    folder exists), after at least two whole checkpoints."""
    r = execute(["pretrain", *flags(TINY, steps=60, save_every=1, keep_last=3, log_every=1000)], work,
                work.parent / "logs" / f"{work.name}-killed", 120, Interrupt(signal.SIGKILL, saving("run", after=2)))
    if r.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run was not killed during a save (exit {r.returncode})")


def killed_preparing(force: bool) -> Callable[[Path], None]:
    """prepare-data into D killed with SIGKILL once its staging folder exists (``force``: over a
    finished copy of the shared dataset, with a vocabulary to train so it takes a while)."""
    def setup(work: Path) -> None:
        if force:
            shutil.copytree(work.parent / "data", work / "D")
        argv = ["prepare-data", "--source", "embedded", "--out", "D", "--no-progress", "--workers", "0"]
        argv += ["--force", "--vocab-size", "4000"] if force else []
        r = execute(argv, work, work.parent / "logs" / f"{work.name}-killed", 120,
                    Interrupt(signal.SIGKILL, lambda cwd, out: (cwd / "D" / ".staging").exists(), delay=0.05))
        if r.returncode != -signal.SIGKILL:
            raise RuntimeError(f"prepare-data was not killed while staging (exit {r.returncode})")
    return setup


def same_as_shared(rel: str) -> Check:
    """Post-condition: dataset ``rel`` holds the shared dataset's files, byte for byte."""
    def check(work: Path, before: dict) -> str | None:
        for name in DATA_FILES:
            a, b = work / rel / name, work.parent / "data" / name
            if not a.is_file() or a.read_bytes() != b.read_bytes():
                return f"{rel}/{name} differs from the dataset it was"
        return None
    return check


def final_metrics(run: Path) -> dict:
    return json.loads((run / "final_metrics.json").read_text())


def finished(run: str = "run") -> Check:
    """Post-condition: ``run`` ended: its final_metrics.json holds no ``stopped``."""
    def check(work: Path, before: dict) -> str | None:
        stopped = final_metrics(work / run).get("stopped")
        return f"{run}/final_metrics.json says stopped {stopped!r}" if stopped else None
    return check


def stopped_in_final_evaluation(work: Path, before: dict) -> str | None:
    """Post-condition: the signal landed in the final evaluation: the stopped run's
    final_metrics.json says ``stopped`` after its last step and holds no evaluation."""
    final = final_metrics(work / "run")
    if final.get("stopped") and not final.get("eval"):
        return None
    return (f"the signal did not land in the final evaluation (stopped {final.get('stopped')!r}, "
            f"eval {sorted(final.get('eval', {}))})")


def newest_is(run: str, name: str) -> Check:
    """Post-condition: ``run``'s newest checkpoint is ``name`` (a signal in the evaluation after
    that step stops the run there, not one step later) and it is whole."""
    def check(work: Path, before: dict) -> str | None:
        newest = newest_checkpoint(work / run)
        return checkpoint_problem(newest) if newest.name == name else f"newest checkpoint {newest.name}, not {name}"
    return check


def evaluated(work: Path, before: dict) -> str | None:
    """Post-condition: the resumed run's final_metrics.json has the valid and test results."""
    evals = sorted(final_metrics(work / "run").get("eval", {}))
    return None if evals == ["test", "valid"] else f"final_metrics.json has the evaluation of {evals}"


def logged(run: str) -> Callable[[Path, str], bool]:
    """Ready when ``run``/metrics.jsonl holds a record (training is under way)."""
    def ready(cwd: Path, out: str) -> bool:
        path = cwd / run / "metrics.jsonl"
        return path.is_file() and path.read_text().count("\n") >= 1
    return ready


def printed(text: str) -> Callable[[Path, str], bool]:
    """Ready when the command has printed ``text``."""
    return lambda cwd, out: text in out


def saving(run: str, after: int = 0) -> Callable[[Path, str], bool]:
    """Ready while ``run`` writes a checkpoint (a ``.tmp-step_*`` folder exists) and holds at least
    ``after`` whole ones."""
    def ready(cwd: Path, out: str) -> bool:
        folder = cwd / run / "checkpoints"
        names = os.listdir(folder) if folder.is_dir() else []
        return any(n.startswith(".tmp-") for n in names) and sum(n.startswith("step_") for n in names) >= after
    return ready


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


SENTENCES = ("The quick brown fox jumps over the lazy dog. It was not amused by this at all. "
             "Then the dog went back to sleep under the old oak tree. ")


def corpus_rows(n: int) -> list[dict]:
    return [{"text": SENTENCES * 3 + f"Document number {i} ends here."} for i in range(n)]


def mnli(**mutate: bytes | str | None) -> Callable[[Path], None]:
    """An MNLI folder ``mnli/`` (the demo task's files, which are in MNLI's layout) with files
    replaced (bytes/str) or deleted (None); ``dev_matched`` stands for ``dev_matched.tsv``."""
    def setup(work: Path) -> None:
        shutil.copytree(DEMO, work / "mnli", ignore=shutil.ignore_patterns("*.py", "__pycache__", ".*"))
        for name, content in mutate.items():
            path = work / "mnli" / f"{name}.tsv"
            path.unlink() if content is None else write(path, content)
    return setup


def demo_with(extra: bytes) -> bytes:
    return (DEMO / "train.tsv").read_bytes() + extra


def race(train_files: dict[str, str | bytes]) -> Callable[[Path], None]:
    """A RACE tree ``race/{train,dev,test}/middle/`` with one good question file per split and
    ``train_files`` added to train."""
    good = json.dumps({"article": SENTENCES * 2, "questions": ["Who slept?", "What jumped?"],
                       "options": [["the dog", "the fox", "the tree", "nobody"]] * 2, "answers": ["A", "B"],
                       "id": "good.txt"})

    def setup(work: Path) -> None:
        for split in ("train", "dev", "test"):
            write(work / "race" / split / "middle" / "good.txt", good)
        for name, content in train_files.items():
            write(work / "race" / "train" / "middle" / name, content)
    return setup


QQP_HEADER = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"


def qqp(label: str) -> Callable[[Path], None]:
    rows = "".join(f"{i}\t{2 * i}\t{2 * i + 1}\twhat is a dog {i}?\twhat is a fox {i}?\t{label}\n" for i in range(40))
    return files(qqp__train_dot_tsv=QQP_HEADER + rows, qqp__dev_dot_tsv=QQP_HEADER + rows)


STUDY = """name = "s"
data = "../data"
[train]
seq_len = 32
global_batch = 4
precision = "fp32"
log_every = 5
[train.cpu]
num_workers = 0
[schemes]
postln = {ln = "post", init = "megatron"}
[families.T]
tokens = 512
evals = 1
shapes = {"1x32" = {layers = 1, hidden = 32, heads = 2}}
lrs = [1e-3]
extend = 0
seeds = [1]
"""


def study(text: str = STUDY) -> Callable[[Path], None]:
    return files(s_dot_toml=text)


def grid(content) -> Callable[[Path], None]:
    return files(g_dot_json=content if isinstance(content, str) else json.dumps(content))


RELU_TINY = {"mu": [0.0], "s": [1.0], "r": [0.5], "g": [1.0], "r_g": [0.5], "L": [100], "samples": [1000]}


def prepare_data_cases() -> list[Case]:
    """prepare-data: missing, empty, binary and malformed corpora, bad vocabularies, flag values,
    output paths, and runs killed with SIGKILL while they stage (a --force one over a dataset)."""
    pd = ["prepare-data", "--no-progress", "--workers", "0"]
    vocab = ["--vocab", "../data/vocab.txt"]
    half = absent("out/dataset.json", "out/tokens.bin")
    good = jsonl(*corpus_rows(30))
    return [
        Case("prepare_missing_source_file", [*pd, "--source", "nope.jsonl", "--out", "out"], "clean_error",
             check=half, quick=True),
        Case("prepare_unknown_source_name", [*pd, "--source", "wikipedia", "--out", "out"], "clean_error", check=half),
        Case("prepare_unsupported_suffix", [*pd, "--source", "c.csv", "--out", "out", *vocab], "clean_error",
             files(c_dot_csv="text\nhello world\n"), half),
        Case("prepare_empty_jsonl", [*pd, "--source", "c.jsonl", "--out", "out", *vocab], "clean_error",
             files(c_dot_jsonl=""), half, quick=True),
        Case("prepare_blank_lines_jsonl", [*pd, "--source", "c.jsonl", "--out", "out", *vocab], "clean_error",
             files(c_dot_jsonl="\n  \n\t\n"), half),
        Case("prepare_empty_texts_jsonl", [*pd, "--source", "c.jsonl", "--out", "out", *vocab], "clean_error",
             files(c_dot_jsonl=jsonl({"text": ""}, {"text": "   "})), half),
        Case("prepare_binary_jsonl", [*pd, "--source", "c.jsonl", "--out", "out", *vocab], "clean_error",
             files(c_dot_jsonl=bytes(range(256)) * 64), half),
        Case("prepare_malformed_rows_skipped", [*pd, "--source", "c.jsonl", "--out", "out", *vocab], "worked",
             files(c_dot_jsonl=good + jsonl("{not json", {"txt": "no text field"}, {"text": 42}, "[1, 2]",
                                            "null", '"a string"', {"text": ["list"]}) + good),
             present("out/dataset.json"), quick=True),
        Case("prepare_malformed_rows_strict", [*pd, "--source", "c.jsonl", "--out", "out", *vocab, "--strict"],
             "clean_error", files(c_dot_jsonl=good + jsonl("{not json") + good), half),
        Case("prepare_not_utf8_txt_line", [*pd, "--source", "c.txt", "--out", "out", *vocab], "worked",
             files(c_dot_txt=(SENTENCES * 40 + "\n").encode() + b"caf\xe9 \xff\xfe broken\n" +
                   (SENTENCES * 40 + "\n").encode()), present("out/dataset.json")),
        Case("prepare_gz_not_gzip", [*pd, "--source", "c.jsonl.gz", "--out", "out", *vocab], "clean_error",
             files(c_dot_jsonl_dot_gz=good), half),
        Case("prepare_gz_truncated", [*pd, "--source", "c.jsonl.gz", "--out", "out", *vocab], "clean_error",
             files(c_dot_jsonl_dot_gz=gzip.compress(good.encode() * 20)[:-200]), half),
        Case("prepare_source_empty_folder", [*pd, "--source", "src", "--out", "out", *vocab], "clean_error",
             lambda w: (w / "src").mkdir(), half),
        Case("prepare_source_folder", [*pd, "--source", "src", "--out", "out", *vocab], "worked",
             files(src__a_dot_jsonl=good, src__b_dot_txt=SENTENCES * 30), present("out/dataset.json")),
        Case("prepare_out_is_file", [*pd, "--out", "f"], "clean_error", files(f="keep me"), unchanged("f"),
             quick=True),
        Case("prepare_out_inside_file", [*pd, "--out", "f/sub"], "clean_error", files(f="keep me"), unchanged("f")),
        Case("prepare_out_missing_parents", [*pd, "--out", "a/b/c"], "worked", check=present("a/b/c/dataset.json")),
        Case("prepare_out_unicode_spaces", [*pd, "--out", "dätä sêt ✓"], "worked",
             check=present("dätä sêt ✓/dataset.json")),
        Case("prepare_rerun_finished", [*pd, "--out", "D"], "worked", copy("data", "D"), unchanged("D/tokens.bin")),
        Case("prepare_force_empty_corpus_keeps_dataset",
             [*pd, "--source", "c.jsonl", "--out", "D", *vocab, "--force"], "clean_error",
             chain(copy("data", "D"), files(c_dot_jsonl="")), same_as_shared("D"), quick=True),
        Case("prepare_force_bad_vocab_keeps_dataset", [*pd, "--out", "D", "--vocab", "v.txt", "--force"],
             "clean_error", chain(copy("data", "D"), files(v_dot_txt="hello\nworld\n")), same_as_shared("D")),
        Case("prepare_vocab_missing", [*pd, "--out", "out", "--vocab", "nope.txt"], "clean_error", check=half),
        Case("prepare_vocab_empty", [*pd, "--out", "out", "--vocab", "v.txt"], "clean_error",
             files(v_dot_txt=""), half),
        Case("prepare_vocab_binary", [*pd, "--out", "out", "--vocab", "v.txt"], "clean_error",
             files(v_dot_txt=bytes(range(256)) * 16), half),
        Case("prepare_vocab_size_zero", [*pd, "--source", "c.jsonl", "--out", "out", "--vocab-size", "0"],
             "clean_error", files(c_dot_jsonl=good), half),
        Case("prepare_vocab_size_negative", [*pd, "--out", "out", "--vocab-size", "-5"], "clean_error", check=half),
        Case("prepare_workers_negative", [*pd[:-2], "--out", "out", "--workers", "-2"], "clean_error", check=half,
             quick=True),
        Case("prepare_workers_not_a_number", [*pd[:-2], "--out", "out", "--workers", "two"], "clean_error",
             check=half),
        Case("prepare_split_two_parts", [*pd, "--out", "out", "--split", "1,2"], "clean_error", check=half),
        Case("prepare_split_not_numbers", [*pd, "--out", "out", "--split", "a,b,c"], "clean_error", check=half),
        Case("prepare_split_all_zero", [*pd, "--out", "out", "--split", "0,0,0"], "clean_error", check=half),
        Case("prepare_split_negative", [*pd, "--out", "out", "--split=-1,1,1"], "clean_error", check=half),
        Case("prepare_deb_not_a_package", [*pd, "--source", "kernel-docs", "--out", "out", "--deb", "x.deb"],
             "clean_error", files(x_dot_deb="not an ar archive"), half),
        Case("prepare_rerun_after_kill9", [*pd, "--out", "D"], "worked", killed_preparing(False),
             same_as_shared("D")),
        Case("prepare_kill9_during_force_keeps_dataset", [*pd, "--out", "D"], "worked", killed_preparing(True),
             same_as_shared("D")),
    ]


def pretrain_cases() -> list[Case]:
    """pretrain: flag values, sizes beyond memory, damaged datasets, output paths, run folders,
    --load of damaged or foreign checkpoints, kill -9 during a save, signals to the process group."""
    def pt(**over) -> list[str]:
        return ["pretrain", *flags(TINY, **over)]

    def bad_flag(name: str, value: str, quick: bool = False, **extra) -> Case:
        """A wrong flag value: refused with one line, and nothing written to --out-dir."""
        return Case(f"pretrain_{name.replace('-', '_')}_{value.replace('-', 'minus').replace('.', '_')}",
                    pt(**{name.replace("-", "_"): value}, **extra), "clean_error", check=absent("run"), quick=quick)

    loaded = all_of(unchanged("run"), absent("run/.old-step_00000002"))
    signal_run = {"steps": 200, "log_every": 5, "num_workers": 1}
    periodic = {"data": "E", "steps": 4, "eval_every": 2, "eval_iters": "all", "log_every": 1}
    return [
        Case("pretrain_tiny_baseline", pt(), "worked", check=whole_checkpoints(), quick=True),
        *[bad_flag(n, v) for n, v in [("steps", "0"), ("steps", "-1"), ("global-batch", "0"), ("layers", "0"),
                                      ("layers", "-1"), ("heads", "0"), ("seq-len", "0"), ("lr", "-1"),
                                      ("lr", "nan"), ("lr", "inf"), ("warmup", "-0.5"), ("dropout", "1.5"),
                                      ("dropout", "-0.1"), ("clip", "abc"), ("save-every", "-1"),
                                      ("eval-every", "-1"), ("eval-iters", "0"), ("eval-iters", "some"),
                                      ("num-workers", "-1"), ("log-every", "0"), ("max-bad-steps", "0"),
                                      ("adam-beta1", "1.5"), ("adam-eps", "-1"), ("epochs", "0"), ("micro-batch", "0"),
                                      ("micro-batch", "3"), ("eval-batch", "0"), ("stop-at", "-3"),
                                      ("peak-tflops", "-1"), ("device", "cuda")]],
        *[bad_flag(n, v, init="dslm", layers=2) for n, v in [("r0", "2"), ("r0", "abc"), ("beta2", "0"),
                                                             ("lam2", "-1")]],
        bad_flag("steps", "abc", quick=True),
        bad_flag("keep-last", "0", quick=True),
        bad_flag("hidden", "30", heads=4),
        Case("pretrain_hidden_65536_out_of_memory", pt(hidden=65536, out_dir="oom"), "clean_error",
             check=absent("oom"), timeout=120),
        Case("pretrain_data_missing", pt(data="nope"), "clean_error", check=absent("run", "nope/dataset.json"),
             quick=True),
        Case("pretrain_data_is_a_file", pt(data="f"), "clean_error", files(f="x"), unchanged("f")),
        Case("pretrain_data_empty_folder", pt(data="D"), "clean_error", lambda w: (w / "D").mkdir(), absent("run")),
        Case("pretrain_data_without_dataset_json", pt(data="D"), "clean_error",
             chain(copy("data", "D"), on("D/dataset.json", remove)), absent("run")),
        Case("pretrain_data_without_vocab", pt(data="D"), "clean_error",
             chain(copy("data", "D"), on("D/vocab.txt", remove)), absent("run"), quick=True),
        Case("pretrain_data_tokens_truncated", pt(data="D"), "clean_error",
             chain(copy("data", "D"), on("D/tokens.bin", truncate)), absent("run")),
        Case("pretrain_data_tokens_same_size_corrupt", pt(data="D"), "clean_error",
             chain(copy("data", "D"), on("D/tokens.bin", lambda p: scramble(p, 4096, 4096))), absent("run")),
        # found when the first batch is read, after the run took its folder: no checkpoint may claim it trained
        Case("pretrain_data_tokens_rot_after_verification", pt(data="D"), "clean_error", verified_then_rotted,
             absent("run/checkpoints"), quick=True),
        Case("pretrain_data_index_same_size_corrupt", pt(data="D"), "clean_error",
             chain(copy("data", "D"), on("D/tokens.idx", lambda p: scramble(p, 0, 64))), absent("run")),
        Case("pretrain_data_index_empty", pt(data="D"), "clean_error",
             chain(copy("data", "D"), on("D/tokens.idx", empty)), absent("run")),
        Case("pretrain_data_manifest_corrupt", pt(data="D"), "clean_error",
             chain(copy("data", "D"), on("D/dataset.json", lambda p: scramble(p, 0, 40))), absent("run")),
        Case("pretrain_data_vocab_same_size_corrupt", pt(data="D"), "clean_error",
             chain(copy("data", "D"), on("D/vocab.txt", lambda p: scramble(p, 2000, 200))), absent("run")),
        Case("pretrain_out_dir_is_file", pt(out_dir="f"), "clean_error", files(f="keep me"), unchanged("f"),
             quick=True),
        Case("pretrain_out_dir_inside_file", pt(out_dir="f/run"), "clean_error", files(f="keep me"), unchanged("f")),
        Case("pretrain_out_dir_missing_parents", pt(out_dir="a/b/run"), "worked",
             check=whole_checkpoints("a/b/run")),
        Case("pretrain_fresh_into_existing_run", pt(), "clean_error", copy("run", "run"), unchanged("run"),
             quick=True),
        Case("pretrain_overwrite_existing_run_keeps_other_files", pt(overwrite=None), "worked",
             chain(copy("run", "run"), files(run__notes_dot_txt="mine")),
             all_of(unchanged("run/notes.txt"), whole_checkpoints())),
        Case("pretrain_stop_at_then_load", pt(steps=4, stop_at=2), "worked", check=all_of(
            whole_checkpoints(), resumes(pt(steps=4, load="run"), finished()))),
        Case("pretrain_load_missing", pt(load="nope", out_dir="new"), "clean_error", check=absent("new"),
             quick=True),
        Case("pretrain_load_empty_folder", pt(load="e", out_dir="new"), "clean_error",
             lambda w: (w / "e").mkdir(), absent("new")),
        Case("pretrain_load_truncated_weights", pt(load="run", steps=4), "clean_error",
             chain(copy("run", "run"), on("run/{ckpt}/model.safetensors", truncate)), loaded, quick=True),
        Case("pretrain_load_weights_header_corrupt", pt(load="run", steps=4), "clean_error",
             chain(copy("run", "run"), on("run/{ckpt}/model.safetensors", lambda p: scramble(p, 8, 32))), loaded),
        Case("pretrain_load_weights_zeroed", pt(load="run", steps=4), "clean_error",
             chain(copy("run", "run"), on("run/{ckpt}/model.safetensors", zeros)), loaded),
        Case("pretrain_load_missing_weights", pt(load="run", steps=4), "clean_error",
             chain(copy("run", "run"), on("run/{ckpt}/model.safetensors", remove)), loaded),
        Case("pretrain_load_missing_trainer", pt(load="run", steps=4), "clean_error",
             chain(copy("run", "run"), on("run/{ckpt}/trainer.pt", remove)), loaded, quick=True),
        Case("pretrain_load_truncated_trainer", pt(load="run", steps=4), "clean_error",
             chain(copy("run", "run"), on("run/{ckpt}/trainer.pt", truncate)), loaded),
        Case("pretrain_load_trainer_same_size_corrupt", pt(load="run", steps=4), "clean_error",
             chain(copy("run", "run"), on("run/{ckpt}/trainer.pt", lambda p: scramble(p, 600, 400))), loaded),
        Case("pretrain_load_missing_meta", pt(load="run", steps=4), "clean_error",
             chain(copy("run", "run"), on("run/{ckpt}/meta.json", remove)), loaded),
        Case("pretrain_load_meta_corrupt", pt(load="run", steps=4), "clean_error",
             chain(copy("run", "run"), on("run/{ckpt}/meta.json", lambda p: scramble(p, 0, 30))), loaded),
        Case("pretrain_load_malicious_rng_pickle", pt(load="run", steps=4), "clean_error",
             chain(copy("run", "run"), planted("run/{ckpt}/rng_rank0.pt")),
             all_of(absent("PWNED"), loaded), quick=True),
        Case("pretrain_load_malicious_trainer_pickle", pt(load="run", steps=4), "clean_error",
             chain(copy("run", "run"), planted("run/{ckpt}/trainer.pt")),
             all_of(absent("PWNED"), loaded)),
        Case("pretrain_load_other_model", pt(load="run", steps=4, layers=2), "clean_error", copy("run", "run"),
             loaded),
        Case("pretrain_load_other_global_batch", pt(load="run", steps=4, global_batch=8), "clean_error",
             copy("run", "run"), loaded),
        Case("pretrain_load_finetune_checkpoint", pt(load="ft", steps=4, out_dir="new"), "clean_error",
             copy("ftrun", "ft"), all_of(unchanged("ft"), absent("new"))),
        Case("pretrain_load_past_steps", pt(load="run", steps=1), "clean_error", copy("run", "run"), loaded),
        Case("pretrain_load_with_leftover_tmp_folder", pt(load="run", steps=4), "worked",
             chain(copy("run", "run"), lambda w: shutil.copytree(newest_checkpoint(w / "run"),
                                                                 w / "run/checkpoints/.tmp-step_00000003"),
                   on("run/checkpoints/.tmp-step_00000003/model.safetensors", truncate)),
             whole_checkpoints()),
        Case("pretrain_load_after_crash_between_renames", pt(load="run", steps=4), "worked",
             chain(copy("run", "run"), lambda w: os.replace(newest_checkpoint(w / "run"),
                                                            w / "run/checkpoints/.old-step_00000002")),
             all_of(whole_checkpoints(), finished())),
        Case("pretrain_load_after_kill9_during_save", pt(load="run", steps=60, keep_last=3), "worked",
             killed_during_save, all_of(whole_checkpoints(), finished()), quick=True, timeout=180),
        Case("pretrain_sigterm_group_during_training", pt(**signal_run), "stopped",
             check=all_of(whole_checkpoints(), resumes(pt(**signal_run, load="run"), finished())),
             interrupt=Interrupt(signal.SIGTERM, logged("run")), quick=True, timeout=180),
        Case("pretrain_sigint_group_during_training", pt(**signal_run), "stopped",
             check=all_of(whole_checkpoints(), resumes(pt(**signal_run, load="run"), finished())),
             interrupt=Interrupt(signal.SIGINT, logged("run")), timeout=180),
        Case("pretrain_sigterm_during_save", pt(steps=60, save_every=1, log_every=1000), "stopped",
             check=all_of(whole_checkpoints(),
                          resumes(pt(steps=60, save_every=1, log_every=1000, load="run"), finished())),
             interrupt=Interrupt(signal.SIGTERM, saving("run")), timeout=180),
        Case("pretrain_sigterm_during_final_evaluation", pt(data="E", steps=3, log_every=1, eval_iters="all"),
             "stopped", big_eval_dataset, all_of(
                 whole_checkpoints(), stopped_in_final_evaluation,
                 resumes(pt(data="E", steps=3, log_every=1, eval_iters="all", load="run"),
                         all_of(finished(), evaluated))),
             Interrupt(signal.SIGTERM, printed("step 3 train:"), delay=0.3), timeout=180),
        Case("pretrain_sigterm_during_periodic_evaluation", pt(**periodic), "stopped", big_eval_dataset,
             all_of(newest_is("run", "step_00000002"), resumes(pt(**periodic, load="run"), finished())),
             Interrupt(signal.SIGTERM, printed("step 2 train:"), delay=0.3), timeout=180),
    ]


def big_eval_dataset(work: Path) -> None:
    """A dataset E with large valid and test splits (an evaluation of a few seconds, time for a
    signal to land in it), its frozen evaluation sets built by a 1-step run beforehand."""
    logs = work.parent / "logs"
    for argv in (["prepare-data", "--source", "embedded", "--out", "E", "--split", "400,300,300", "--no-progress"],
                 ["pretrain", *flags(TINY, data="E", out_dir="warm", steps=1, eval_iters="all")]):
        r = execute(argv, work, logs / f"{work.name}-{argv[0]}", 240)
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {last_line(r.stderr)}")


def finetune_cases() -> list[Case]:
    """finetune: flag values, --init-from, vocabularies, token caches, run folders, --load, the
    MNLI, QQP and RACE readers on damaged files, SIGTERM to the process group."""
    def ft(**over) -> list[str]:
        return ["finetune", *flags(FT, **over)]

    def task(name: str, folder: str, **over) -> list[str]:
        return ft(task=name, data=folder, max_len=64, qa_max_len=16, **over)

    signal_run = {"steps": 300, "log_every": 5, "num_workers": 1}
    pretrained = {"layers": DROP, "hidden": DROP, "heads": DROP, "init": DROP}   # the model comes from --init-from
    bad_mnli_row = "x\t1\t1\tcode\t\t\t\t\tonly a premise\n"          # too few columns
    unknown_label = "1\t2\t3\tcode\t\t\t\t\ta\tb\tx\tmaybe\n"
    return [
        Case("finetune_demo_baseline", ft(), "worked", check=whole_checkpoints("ft"), quick=True),
        Case("finetune_no_task", ft(task=DROP), "clean_error", check=absent("ft"), quick=True),
        Case("finetune_max_len_0", ft(max_len=0), "clean_error", check=absent("ft")),
        Case("finetune_max_len_2", ft(max_len=2), "clean_error", check=absent("ft")),
        Case("finetune_max_train_negative", ft(max_train=-1), "clean_error", check=absent("ft")),
        Case("finetune_race_level_bad", ft(race_level="elementary"), "clean_error", check=absent("ft")),
        Case("finetune_hidden_65536_out_of_memory", ft(hidden=65536, heads=2), "clean_error", check=absent("ft"),
             timeout=120),
        Case("finetune_init_from_missing", ft(init_from="nope"), "clean_error", check=absent("ft")),
        Case("finetune_init_from_pretraining_run", ft(init_from="run", **pretrained), "worked", copy("run", "run"),
             whole_checkpoints("ft")),
        Case("finetune_init_from_truncated_weights", ft(init_from="run", **pretrained), "clean_error",
             chain(copy("run", "run"), on("run/{ckpt}/model.safetensors", truncate)), absent("ft")),
        Case("finetune_init_from_config_corrupt", ft(init_from="run", **pretrained), "clean_error",
             chain(copy("run", "run"), on("run/{ckpt}/config.json", lambda p: scramble(p, 0, 20))), absent("ft")),
        Case("finetune_init_from_hf_folder_malicious_bin", ft(init_from="hf", **pretrained), "clean_error",
             chain(files(hf__config_dot_json=json.dumps({"model_type": "bert", "hidden_size": 32,
                                                         "num_hidden_layers": 1, "num_attention_heads": 2,
                                                         "intermediate_size": 64, "vocab_size": 8192})),
                   planted("hf/pytorch_model.bin")),
             absent("PWNED", "ft"), quick=True),
        Case("finetune_vocab_missing", ft(vocab="nope.txt"), "clean_error", check=absent("ft")),
        Case("finetune_vocab_empty", ft(vocab="v.txt"), "clean_error", files(v_dot_txt=""), absent("ft")),
        Case("finetune_out_dir_is_file", ft(out_dir="f"), "clean_error", files(f="keep me"), unchanged("f")),
        Case("finetune_cache_dir_is_file_runs_uncached", ft(cache_dir="f"), "worked", files(f="keep me"),
             all_of(unchanged("f"), whole_checkpoints("ft"))),   # the cache is optional: unwritable, it is skipped
        Case("finetune_fresh_into_existing_run", ft(), "clean_error", copy("ftrun", "ft"), unchanged("ft")),
        Case("finetune_load_truncated_weights", ft(load="ft", steps=4), "clean_error",
             chain(copy("ftrun", "ft"), on("ft/{ckpt}/model.safetensors", truncate)), unchanged("ft")),
        Case("finetune_load_malicious_rng_pickle", ft(load="ft", steps=4), "clean_error",
             chain(copy("ftrun", "ft"), planted("ft/{ckpt}/rng_rank0.pt")),
             all_of(absent("PWNED"), unchanged("ft"))),
        Case("finetune_load_pretraining_checkpoint", ft(load="run", out_dir="run"), "clean_error", copy("run", "run"),
             unchanged("run")),
        Case("finetune_cache_truncated_rebuilt", ft(), "worked",
             chain(copy("ftcache", "cache"), lambda w: [truncate(p) for p in (w / "cache").glob("*.npz")]),
             whole_checkpoints("ft")),
        Case("finetune_cache_same_size_corrupt_rebuilt", ft(), "worked",
             chain(copy("ftcache", "cache"),
                   lambda w: [scramble(p, p.stat().st_size // 2, 256) for p in (w / "cache").glob("*.npz")]),
             whole_checkpoints("ft"), quick=True),
        Case("finetune_mnli_missing_folder", task("mnli", "nope"), "clean_error", check=absent("ft")),
        Case("finetune_mnli_empty_train", task("mnli", "mnli"), "clean_error", mnli(train=""), absent("ft")),
        Case("finetune_mnli_missing_dev", task("mnli", "mnli"), "clean_error", mnli(dev_mismatched=None),
             absent("ft")),
        Case("finetune_mnli_header_without_columns", task("mnli", "mnli"), "clean_error",
             mnli(train="a\tb\tc\n1\t2\t3\n"), absent("ft")),
        Case("finetune_mnli_binary_train", task("mnli", "mnli"), "clean_error", mnli(train=bytes(range(256)) * 32),
             absent("ft")),
        Case("finetune_mnli_malformed_rows_skipped", task("mnli", "mnli"), "worked",
             mnli(train=demo_with(bad_mnli_row.encode() + b"\n\xff\xfe not UTF-8\n" + unknown_label.encode())),
             whole_checkpoints("ft")),
        Case("finetune_mnli_all_rows_malformed", task("mnli", "mnli"), "clean_error",
             mnli(train=(DEMO / "train.tsv").read_text().splitlines()[0] + "\n" + bad_mnli_row * 20), absent("ft")),
        Case("finetune_qqp_unknown_labels", task("qqp", "qqp"), "clean_error", qqp("maybe"), absent("ft")),
        Case("finetune_qqp_small", task("qqp", "qqp"), "worked", qqp("1"), whole_checkpoints("ft")),
        Case("finetune_race_missing_tree", task("race", "nope"), "clean_error", check=absent("ft")),
        Case("finetune_race_malformed_files_skipped", task("race", "race"), "worked",
             race({"bad.txt": "{not json", "short.txt": json.dumps({"article": "a", "questions": ["q"],
                                                                    "options": [["x", "y"]], "answers": ["A"]})}),
             whole_checkpoints("ft")),
        Case("finetune_sigterm_group_during_training", ft(**signal_run), "stopped",
             check=all_of(whole_checkpoints("ft"), resumes(ft(**signal_run, load="ft"), finished("ft"))),
             interrupt=Interrupt(signal.SIGTERM, logged("ft")), timeout=180),
    ]


def simulate_cases() -> list[Case]:
    """simulate: grid files (missing, corrupt, wrong axes and values), flag values, --json paths."""
    sim = ["simulate", "--device", "cpu", "--quiet"]
    tiny = [*sim, "--grid", "g.json"]
    return [
        Case("simulate_tiny_grid", [*tiny, "--json", "out.json"], "worked", grid({"relu": RELU_TINY}),
             present("out.json"), quick=True),
        Case("simulate_grid_missing", [*sim, "--grid", "nope.json"], "clean_error", quick=True),
        Case("simulate_grid_corrupt_json", tiny, "clean_error", grid('{"relu": {"r": [0.5')),
        Case("simulate_grid_not_an_object", tiny, "clean_error", grid([1, 2, 3])),
        Case("simulate_grid_unknown_component", tiny, "clean_error", grid({"swish": {"r": [0.5]}})),
        Case("simulate_grid_unknown_axis", tiny, "clean_error", grid({"relu": {**RELU_TINY, "depth": [3]}})),
        Case("simulate_grid_axis_not_a_list", tiny, "clean_error", grid({"relu": {**RELU_TINY, "r": 0.5}})),
        Case("simulate_grid_axis_empty", tiny, "clean_error", grid({"relu": {**RELU_TINY, "r": []}})),
        Case("simulate_grid_axis_text", tiny, "clean_error", grid({"relu": {**RELU_TINY, "s": ["one"]}})),
        Case("simulate_grid_samples_zero", tiny, "clean_error", grid({"relu": {**RELU_TINY, "samples": [0]}})),
        Case("simulate_grid_length_negative", tiny, "clean_error", grid({"relu": {**RELU_TINY, "L": [-5]}})),
        Case("simulate_grid_correlation_out_of_range", tiny, "clean_error", grid({"relu": {**RELU_TINY, "r": [2.0]}})),
        Case("simulate_component_unknown", [*sim, "--component", "swish"], "clean_error"),
        Case("simulate_budget_zero", [*tiny, "--budget-gb", "0"], "clean_error", grid({"relu": RELU_TINY})),
        Case("simulate_budget_negative", [*tiny, "--budget-gb", "-1"], "clean_error", grid({"relu": RELU_TINY})),
        Case("simulate_budget_tiny", [*tiny, "--budget-gb", "0.0001"], "worked", grid({"relu": RELU_TINY})),
        Case("simulate_seed_text", [*sim, "--seed", "x"], "clean_error"),
        Case("simulate_device_cuda_without_gpu", [*tiny[:1], "--device", "cuda", "--grid", "g.json"], "clean_error",
             grid({"relu": RELU_TINY})),
        Case("simulate_json_is_folder", [*tiny, "--json", "d"], "clean_error",
             chain(grid({"relu": RELU_TINY}), lambda w: (w / "d").mkdir()), quick=True),
        Case("simulate_json_inside_file", [*tiny, "--json", "f/out.json"], "clean_error",
             chain(grid({"relu": RELU_TINY}), files(f="keep me")), unchanged("f")),
        Case("simulate_json_missing_parents", [*tiny, "--json", "a/b/out.json"], "worked", grid({"relu": RELU_TINY}),
             present("a/b/out.json")),
        Case("simulate_json_replaces_file", [*tiny, "--json", "out.json"], "worked",
             chain(grid({"relu": RELU_TINY}), files(out_dot_json="old")),
             lambda w, b: None if json.loads((w / "out.json").read_text()) else "out.json empty"),
    ]


def approximations_cases() -> list[Case]:
    """approximations: --points values (one beyond memory) and --out paths."""
    ap = ["approximations", "--out", "out"]
    return [
        Case("approximations_points_3", [*ap, "--points", "3"], "worked", check=present("out/approximations.json"),
             quick=True),
        Case("approximations_points_0", [*ap, "--points", "0"], "clean_error", check=absent("out"), quick=True),
        Case("approximations_points_negative", [*ap, "--points", "-1"], "clean_error", check=absent("out")),
        Case("approximations_points_text", [*ap, "--points", "many"], "clean_error", check=absent("out")),
        Case("approximations_points_beyond_memory", [*ap, "--points", "100000000000"], "clean_error",
             check=absent("out"), timeout=120),
        Case("approximations_out_is_file", ["approximations", "--out", "f", "--points", "11"], "clean_error",
             files(f="keep me"), unchanged("f"), quick=True),
        Case("approximations_out_inside_file", ["approximations", "--out", "f/sub", "--points", "11"], "clean_error",
             files(f="keep me"), unchanged("f")),
        Case("approximations_out_missing_parents", ["approximations", "--out", "a/b/c", "--points", "11"], "worked",
             check=present("a/b/c/approximations.json")),
        Case("approximations_json_name_is_folder", [*ap, "--points", "11"], "clean_error",
             lambda w: (w / "out" / "approximations.json").mkdir(parents=True)),
    ]


def figures_cases() -> list[Case]:
    """figures: damaged datasets, size and scheme flags, --out paths, a size beyond memory."""
    def fig(**over) -> list[str]:
        return ["figures", *flags(FIGS, **over)]

    return [
        Case("figures_small", fig(), "worked", check=present("figs/signal_propagation.json"), quick=True),
        Case("figures_data_missing", fig(data="nope"), "clean_error", check=absent("figs")),
        Case("figures_data_without_vocab", fig(data="D"), "clean_error",
             chain(copy("data", "D"), on("D/vocab.txt", remove)), absent("figs")),
        Case("figures_data_tokens_same_size_corrupt", fig(data="D"), "clean_error",
             chain(copy("data", "D"), on("D/tokens.bin", lambda p: scramble(p, 4096, 4096))), absent("figs")),
        Case("figures_layers_0", fig(layers=0), "clean_error", check=absent("figs"), quick=True),
        Case("figures_hidden_not_multiple_of_heads", fig(hidden=30, heads=4), "clean_error", check=absent("figs")),
        Case("figures_batch_0", fig(batch=0), "clean_error", check=absent("figs")),
        Case("figures_micro_batch_not_dividing_batch", fig(micro_batch=3), "worked",   # a shorter last chunk
             check=present("figs/signal_propagation.json")),
        Case("figures_dropout_2", fig(dropout=2), "clean_error", check=absent("figs")),
        Case("figures_r0_0", fig(init="dslm", r0=0), "clean_error", check=absent("figs")),
        Case("figures_r0_1_5", fig(init="dslm", r0=1.5), "clean_error", check=absent("figs")),
        Case("figures_seq_len_0", fig(seq_len=0), "clean_error", check=absent("figs")),
        Case("figures_lam2_negative", fig(init="dslm", lam2=-1), "clean_error", check=absent("figs")),
        Case("figures_deepnorm_pre_ln", ["figures", *flags(FIGS, init="deepnorm"), "--placements", "pre"],
             "clean_error", check=absent("figs")),
        Case("figures_device_cuda_without_gpu", fig(device="cuda"), "clean_error", check=absent("figs")),
        Case("figures_out_is_file", fig(out="f"), "clean_error", files(f="keep me"), unchanged("f")),
        Case("figures_out_inside_file", fig(out="f/figs"), "clean_error", files(f="keep me"), unchanged("f")),
        Case("figures_hidden_65536_out_of_memory", fig(hidden=65536), "clean_error", check=absent("figs"),
             timeout=120),
    ]


def finetune_sweep_cases() -> list[Case]:
    """finetune-sweep: one real tiny run, a dry run, flag values, a run flag its runs reject."""
    def sweep(*extra: str, **over) -> list[str]:
        """One lr x one seed of the tiny demo run; ``extra`` goes to every run (after --)."""
        base = {"--task": "demo", "--lrs": "1e-3", "--seeds": "1", "--nproc": "1", "--out": "sw"}
        return ["finetune-sweep", *flags(base, **over), "--", *flags(FT, out_dir=DROP, task=DROP), *extra]

    return [
        Case("finetune_sweep_dry_run", sweep(dry_run=None), "worked", quick=True),
        Case("finetune_sweep_one_run", sweep(), "worked", check=present("sw/results.json"), timeout=120),
        Case("finetune_sweep_lrs_text", sweep(lrs="abc"), "clean_error", check=absent("sw")),
        Case("finetune_sweep_lrs_negative", sweep(lrs="-0.001"), "clean_error", check=absent("sw")),
        Case("finetune_sweep_seeds_text", sweep(seeds="x"), "clean_error", check=absent("sw")),
        Case("finetune_sweep_nproc_0", sweep(nproc=0), "clean_error", check=absent("sw")),
        Case("finetune_sweep_out_is_file", sweep(out="f"), "clean_error", files(f="keep me"), unchanged("f")),
        Case("finetune_sweep_bad_run_flag", sweep("--steps", "-4"), "clean_error"),
        Case("finetune_sweep_aggregate_only_nothing", sweep(aggregate_only=None), "clean_error"),
    ]


def study_cases() -> list[Case]:
    """study: one real tiny study, a dry run, damaged and invalid specs, flag values, a corrupt record."""
    st = ["study", "s.toml", "--out", "out", "--work", "work", "--device", "cpu", "--no-plots"]
    return [
        Case("study_dry_run", [*st, "--dry-run"], "worked", study(), quick=True),
        Case("study_tiny", st, "worked", study(), present("out/results.json"), timeout=180),
        Case("study_spec_missing", ["study", "nope.toml"], "clean_error", quick=True),
        Case("study_spec_corrupt_toml", st, "clean_error", study("name = [unclosed\n")),
        Case("study_spec_binary", st, "clean_error", study(bytes(range(256)) * 8), quick=True),
        Case("study_spec_unknown_key", st, "clean_error", study("colour = 1\n" + STUDY)),
        Case("study_spec_reserved_train_key", st, "clean_error",
             study(STUDY.replace("log_every", "lr = 1\nlog_every"))),
        Case("study_spec_without_families", st, "clean_error", study(STUDY.split("[families.T]")[0])),
        Case("study_spec_data_missing", st, "clean_error", study(STUDY.replace('"../data"', '"nope"'))),
        Case("study_spec_seq_len_zero", st, "clean_error", study(STUDY.replace("seq_len = 32", "seq_len = 0"))),
        Case("study_spec_shape_heads_not_dividing", [*st, "--max-failures", "1"], "clean_error",
             study(STUDY.replace("heads = 2", "heads = 3"))),
        Case("study_spec_tokens_negative", st, "clean_error", study(STUDY.replace("tokens = 512", "tokens = -512"))),
        Case("study_jobs_0", [*st, "--jobs", "0"], "clean_error", study()),
        Case("study_time_limit_negative", [*st, "--time-limit", "-1"], "clean_error", study()),
        Case("study_out_is_file", [*st[:3], "f", *st[4:]], "clean_error", chain(study(), files(f="keep me")),
             unchanged("f")),
        Case("study_report_only_corrupt_record", [*st, "--report-only"], "clean_error",
             chain(study(), files(out__records__x_dot_json="{broken"))),
    ]


def all_cases() -> list[Case]:
    return (prepare_data_cases() + pretrain_cases() + finetune_cases() + simulate_cases() + approximations_cases()
            + figures_cases() + finetune_sweep_cases() + study_cases())


# ---- the sweep -----------------------------------------------------------------------------------
def make_shared(root: Path) -> None:
    """The dataset (``data``), a 2-step pretraining run (``run``) and a 2-step finetuning run
    (``ftrun``, its token cache in ``ftcache``) that cases copy; the pretraining run also verifies
    the dataset and builds its evaluation sets, so cases that read it in parallel only read."""
    (root / "logs").mkdir()
    for name, argv in (("data", ["prepare-data", "--source", "embedded", "--out", "data", "--no-progress",
                                 "--workers", "0"]),
                       ("run", ["pretrain", *flags(TINY, data="data")]),
                       ("ftrun", ["finetune", *flags(FT, out_dir="ftrun", cache_dir="ftcache")])):
        r = execute(argv, root, root / "logs" / f"shared-{name}", 240)
        if r.returncode != 0:
            raise SystemExit(f"making the shared {name} failed: dslm {shlex.join(argv)}\n{r.stderr}")


def run_case(case: Case, root: Path) -> dict:
    """Set up, run, check and classify one case; its record for the JSON file."""
    work = root / case.name
    work.mkdir()
    record = {"name": case.name, "command": "dslm " + shlex.join(case.command), "expected": case.expected}
    try:
        if case.setup:
            case.setup(work)
    except Exception as e:  # noqa: BLE001 - a setup that fails is reported, the sweep goes on
        return {**record, "outcome": "failed", "exit_code": None, "seconds": 0.0, "last_stderr_line": "",
                "last_stdout_line": "", "problem": f"setup failed: {e.__class__.__name__}: {e}"[:200]}
    before = digest(work)
    result = execute(case.command, work, root / "logs" / case.name, case.timeout, case.interrupt)
    try:
        problem = None if result.timed_out or case.check is None else case.check(work, before)
    except Exception as e:  # noqa: BLE001 - an output the check cannot read is a failed post-condition
        problem = f"post-check: {e.__class__.__name__}: {e}"
    outcome = classify(case.expected, result, problem, case.interrupt.sig if case.interrupt else None)
    def trim(text: str) -> str:
        return text.replace(str(root), "$TMP")[:200]

    return {**record, "outcome": outcome, "exit_code": result.returncode, "seconds": round(result.seconds, 2),
            "last_stderr_line": trim(last_line(result.stderr)), "last_stdout_line": trim(last_line(result.stdout)),
            "problem": trim(problem) if problem else None}


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def versions() -> dict:
    import torch

    head = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__, "dslm": head}


def print_table(records: list[dict]) -> None:
    """One line per case (the command cut at 70 characters); under a case that is not clean, why:
    its exception, failed post-condition, or last line of output."""
    width = max(len(r["name"]) for r in records)
    print(f"{'case':<{width}}  {'command':<70}  {'expected':<11}  outcome")
    for r in records:
        command = r["command"] if len(r["command"]) <= 70 else r["command"][:69] + "…"
        print(f"{r['name']:<{width}}  {command:<70}  {r['expected']:<11}  {r['outcome']}")
        if r["outcome"] != r["expected"]:
            first = r["last_stderr_line"] if r["outcome"] == "traceback" else r["problem"]
            why = first or r["last_stderr_line"] or f"(stdout) {r['last_stdout_line']}"
            print(f"{'':<{width}}    -> exit {r['exit_code']}: {why[:150]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the cases marked quick (under 2 minutes)")
    parser.add_argument("--only", default=None, help="only cases whose name matches this regular expression")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at the same time (default 2)")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="run in this new folder and keep it (case folders, logs/) instead of a temporary one")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fault_sweep.json"),
                        help="where to write the results")
    args = parser.parse_args(argv)
    cases = [c for c in all_cases() if (c.quick or not args.quick) and (not args.only or re.search(args.only, c.name))]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dslm-fault-sweep-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        make_shared(root)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            records = list(pool.map(lambda c: run_case(c, root), cases))
    print_table(records)
    counts = {k: sum(r["outcome"] == k for r in records) for k in OUTCOMES}
    result = {
        "cases": len(records), "counts": counts, "clean": sum(r["outcome"] == r["expected"] for r in records),
        "seconds": round(time.perf_counter() - started, 1),
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpu": cpu_name(), "cpus": os.cpu_count()},
        "versions": versions(),
        "command": shlex.join(["python", "benchmarks/fault_sweep.py", *(sys.argv[1:] if argv is None else argv)]),
        "results": records,
    }
    print(f"\n{result['cases']} cases in {result['seconds']:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
