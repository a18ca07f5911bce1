"""Run a study: ``dslm pretrain`` processes scheduled over GPU slots (or CPU jobs), one record each.

Every run is a separate ``python -m dslm pretrain`` process, the same code path as a user's run, in
its own folder ``<work>/<run id>/`` (checkpoints, metrics.jsonl, TensorBoard, log.txt). When it
ends, the runner writes ``<out>/records/<run id>.json`` (temp file + rename): the exact flags, the
status (done / nonfinite / failed), the final valid and test metrics, speed, and the curves. The
records are the study's memory: a finished run is never run again, a run whose folder holds a
checkpoint resumes from it (``--load``), and anything else starts over. The spec's planner
(:func:`dslm.study.spec.plan`) is asked again after every finished run, so the learning-rate
extensions and the seed repeats start as soon as they are known.

After ``max_failures`` failed processes in a row (a broken setup, not a diverged model) the study
stops instead of burning through its grid. ``time_limit`` (seconds) bounds a batch of work: no run starts unless the runs of its shape so far
say it will finish in time, and at the limit the running ones get SIGTERM (each writes a checkpoint
and is resumed next time). SIGTERM / SIGINT to the study does the same at once.
"""
from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dslm.files import write_json_atomic
from dslm.data.manifest import read_manifest
from dslm.data.store import BIN_FILE
from dslm.errors import UsageError
from dslm.study.spec import Run, Spec, as_argv, non_embedding_params, plan, pretrain_flags

RECORDS = "records"
_CURVE_POINTS = 64


@dataclass
class _Running:
    run: Run
    slot: int
    proc: subprocess.Popen
    started: float
    folder: Path
    flags: dict


def read_records(out: Path) -> dict[str, dict]:
    """The finished runs of a study folder, by run id."""
    folder = out / RECORDS
    records = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: unreadable run record ({e}); delete it to run that run again") from None
        records[record["id"]] = record
    return records


def dataset_fingerprint(data_dir) -> str:
    """The SHA-256 of the dataset's token store (from its manifest): the data a record was made on."""
    return read_manifest(data_dir)["files"][BIN_FILE]["sha256"]


def check_same_data(records: dict, data_sha256: str, out: Path) -> None:
    """Refuse to add runs to a study whose records were made on another token store (a rebuilt
    dataset with a different vocabulary or source version): their losses would not compare."""
    other = sorted(rid for rid, r in records.items() if r.get("data_sha256") != data_sha256)
    if other:
        raise UsageError(f"{out}: {len(other)} records (e.g. {other[0]}) were made on another dataset than "
                         f"{data_sha256[:12]}; continue on that dataset or start a new --out")


def slots_for(device: str, gpus: int | None, per_gpu: int, jobs: int) -> list[tuple[str, str | None]]:
    """(device, CUDA_VISIBLE_DEVICES) per concurrent run."""
    if device == "cpu":
        return [("cpu", None)] * jobs
    import torch

    visible = torch.cuda.device_count()
    if device == "cuda" and visible == 0:
        raise UsageError("--device cuda: no GPU is visible")
    if visible == 0:
        return [("cpu", None)] * jobs
    count = visible if gpus is None else min(gpus, visible)
    ids = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = ids.split(",")[:count] if ids else [str(i) for i in range(count)]
    return [("cuda", name) for name in names for _ in range(per_gpu)]


def device_name(slot: tuple[str, str | None], slots: list) -> str:
    """What a run's record names as its machine: the GPU model (``NVIDIA H100 80GB HBM3``) or the
    CPU, so that timings from batches on different machines are never compared unknowingly."""
    device, visible = slot
    if device == "cpu":
        return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    import torch

    order = list(dict.fromkeys(name for kind, name in slots if kind == "cuda"))
    return torch.cuda.get_device_name(order.index(visible))


class StudyRunner:
    def __init__(self, spec: Spec, out: Path, work: Path, slots: list, time_limit: float | None = None,
                 retry_failed: bool = False, max_failures: int = 3, echo=print, stall_line: float | None = None):
        self.spec, self.out, self.work, self.slots = spec, out, work, slots
        self.stall_line = stall_line      # for the learning-rate refinement (spec.cell_search)
        self.time_limit, self.max_failures, self.echo = time_limit, max_failures, echo
        self.failures_in_a_row = 0
        self.data_sha256 = dataset_fingerprint(spec.data)
        self.records = read_records(out)
        check_same_data(self.records, self.data_sha256, out)
        (out / RECORDS).mkdir(parents=True, exist_ok=True)
        if retry_failed:
            for rid in [k for k, r in self.records.items() if r["status"] == "failed"]:
                (out / RECORDS / f"{rid}.json").unlink()
                del self.records[rid]
        self.running: dict[int, _Running] = {}
        self.stop_reason: str | None = None
        self.deferred = 0

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, on_record=None) -> int:
        """Run until the plan is empty (returns 0), or until the time limit or a signal stops it or
        runs were left for lack of time (returns 3). ``on_record(record)`` is called after each
        finished run."""
        t0 = time.monotonic()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                elapsed = time.monotonic() - t0
                if self.time_limit is not None and elapsed >= self.time_limit and self.stop_reason is None:
                    self.stop_reason = f"time limit {self.time_limit:g} s"
                    self._terminate_all()
                if self.stop_reason is None:
                    self._launch_free_slots(elapsed)
                if not self.running:
                    break
                time.sleep(0.2)
                for slot, job in list(self.running.items()):
                    if job.proc.poll() is not None:
                        del self.running[slot]
                        record = self._collect(job)
                        if record is not None and on_record:
                            on_record(record)
        finally:
            self._terminate_all()
            for job in self.running.values():
                job.proc.wait()
            for s, handler in old.items():
                signal.signal(s, handler)
        return 3 if self.stop_reason or self.deferred else 0

    def pending(self) -> list[Run]:
        busy = {job.run.id for job in self.running.values()}
        return [r for r in plan(self.spec, self.records, self.stall_line) if r.id not in busy]

    def _on_signal(self, signum, frame):
        self.stop_reason = signal.Signals(signum).name
        self._terminate_all()

    def _terminate_all(self):
        for job in self.running.values():
            if job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)


    def _launch_free_slots(self, elapsed: float) -> None:
        free = [i for i in range(len(self.slots)) if i not in self.running]
        if not free:
            return
        self.deferred = 0
        for run in self.pending():
            if not free:
                break
            # a run estimated at nearly the whole limit still starts at the beginning of a batch
            estimate = min(estimate_seconds(self.spec, self.records, run), 0.8 * (self.time_limit or 0))
            if self.time_limit is not None and elapsed + estimate > self.time_limit:
                self.deferred += 1
                continue
            self._launch(run, free.pop(0))

    # ---- one run -------------------------------------------------------------------------------
    def _launch(self, run: Run, slot: int) -> None:
        device, visible = self.slots[slot]
        flags = pretrain_flags(self.spec, run, device)
        folder = self.work / run.id
        resume = _has_checkpoint(folder) and _same_flags(folder, flags)
        if not resume and folder.exists():
            _clear(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "run.json", {"id": run.id, "flags": flags})
        argv = [sys.executable, "-m", "dslm", "pretrain", "--data", self.spec.data, "--out-dir", str(folder),
                "--device", device, "--no-progress", *as_argv(flags)]
        if resume:
            argv += ["--load", str(folder)]
        env = dict(os.environ)
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        log = open(folder / "log.txt", "a")
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.running[slot] = _Running(run, slot, proc, time.time(), folder, flags)
        where = f"GPU {visible}" if visible is not None else device
        self.echo(f"start  {run.id} on {where}{' (resuming)' if resume else ''}")

    def _collect(self, job: _Running) -> dict | None:
        """The record of a finished process, written to ``records/``; None when it was stopped (it
        resumes next time from its checkpoint)."""
        rc, folder = job.proc.returncode, job.folder
        final = _read_json(folder / "final_metrics.json")
        log_tail = _tail(folder / "log.txt")
        if rc == 0 and final is not None and not final.get("stopped"):
            status = "done"
        elif rc == 1 and "non-finite loss" in log_tail:
            status = "nonfinite"
        elif self.stop_reason is not None or (final or {}).get("stopped"):
            self.echo(f"stop   {job.run.id} (checkpointed, resumes on the next call)")
            return None
        else:
            status = "failed"
        record = self._record(job, status, final or {}, log_tail)
        write_json_atomic(self.out / RECORDS / f"{job.run.id}.json", record)
        self.failures_in_a_row = self.failures_in_a_row + 1 if status == "failed" else 0
        if self.failures_in_a_row >= self.max_failures and self.stop_reason is None:
            self.stop_reason = f"{self.failures_in_a_row} runs failed in a row (see their log.txt)"
            self._terminate_all()
        self.records[job.run.id] = record
        loss = record.get("valid_mlm_loss")
        shown = f"valid MLM loss {loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else status
        self.echo(f"finish {job.run.id}: {shown} ({record['wall_s']:.0f} s)"
                  + (f"; see {folder / 'log.txt'}" if status == "failed" else ""))
        return record

    def _record(self, job: _Running, status: str, final: dict, log_tail: str) -> dict:
        run, spec = job.run, self.spec
        shape = spec.families[run.family].shapes[run.shape]
        valid = final.get("eval", {}).get("valid", {})
        test = final.get("eval", {}).get("test", {})
        train_curve, valid_curve = _curves(folder=job.folder, started=job.started)
        steps = final.get("steps") or (train_curve[-1][0] if train_curve else 0)
        return {
            "id": run.id, "family": run.family, "shape": run.shape, "scheme": run.scheme, "lr": run.lr,
            "seed": run.seed, "layers": shape["layers"], "hidden": shape["hidden"],
            "non_embedding_params": non_embedding_params(shape), "status": status,
            "steps": steps, "tokens": steps * spec.train["global_batch"] * spec.train["seq_len"],
            "wall_s": round(time.time() - job.started, 2), "tokens_per_s": final.get("tokens_per_s"),
            "valid_mlm_loss": valid.get("mlm_loss"), "valid_mlm_acc": valid.get("mlm_acc"),
            "test_mlm_loss": test.get("mlm_loss"), "test_mlm_acc": test.get("mlm_acc"),
            "train_loss": final.get("train", {}).get("loss"), "skipped_steps": final.get("skipped_steps"),
            "peak_mem_gib": final.get("train", {}).get("peak_mem_gib"),
            "device": self.slots[job.slot][0], "device_name": device_name(self.slots[job.slot], self.slots),
            "data_sha256": self.data_sha256, "flags": job.flags,
            **({"grad_profile": final["grad_profile"]} if "grad_profile" in final else {}),
            "curve_train": train_curve, "curve_valid": valid_curve,
            **({"log_tail": log_tail[-2000:]} if status != "done" else {}),
        }


def estimate_seconds(spec: Spec, records: dict, run: Run) -> float:
    """Seconds ``run`` is expected to take: the slowest finished run of its family and shape. For a
    shape with none yet, the slowest run of the finished shape nearest in depth, scaled by layers x
    tokens (the study's small models are launch-bound: time grows with the kernels launched) and by
    the width when it grows (compute); 0 when nothing finished. Overestimating only defers a run to
    the next batch, underestimating wastes a run killed at the time limit."""
    def size(family: str, shape: str) -> tuple[int, int, int]:
        fam = spec.families[family]
        return fam.shapes[shape]["layers"], fam.shapes[shape]["hidden"], fam.tokens

    walls: dict[tuple[str, str], float] = {}
    for r in records.values():
        if r.get("wall_s") and r["family"] in spec.families and r["shape"] in spec.families[r["family"]].shapes:
            key = (r["family"], r["shape"])
            walls[key] = max(walls.get(key, 0.0), r["wall_s"])
    if (run.family, run.shape) in walls or not walls:
        return walls.get((run.family, run.shape), 0.0)
    layers, hidden, tokens = size(run.family, run.shape)
    ref = min(walls, key=lambda k: (abs(math.log(size(*k)[0] / layers)), -walls[k]))
    ref_layers, ref_hidden, ref_tokens = size(*ref)
    return walls[ref] * layers / ref_layers * tokens / ref_tokens * max(1.0, hidden / ref_hidden)


def _has_checkpoint(folder: Path) -> bool:
    return any((folder / "checkpoints").glob("step_*")) if (folder / "checkpoints").is_dir() else False


def _same_flags(folder: Path, flags: dict) -> bool:
    saved = _read_json(folder / "run.json")
    return saved is not None and saved.get("flags") == json.loads(json.dumps(flags))


def _clear(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, size: int = 8000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _curves(folder: Path, started: float) -> tuple[list, list]:
    """From metrics.jsonl: train points [step, seconds since the process started, loss, grad norm]
    (at most ``_CURVE_POINTS``, evenly thinned) and valid points [step, seconds, MLM loss, MLM acc]."""
    train, valid = [], []
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return train, valid
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        t = round(r.get("time", started) - started, 2)
        if r.get("split") == "train":
            train.append([r["step"], t, _num(r.get("loss")), _num(r.get("grad_norm"))])
        elif r.get("split") == "valid":
            valid.append([r["step"], t, _num(r.get("mlm_loss")), _num(r.get("mlm_acc"))])
    if len(train) > _CURVE_POINTS:
        keep = sorted({round(i * (len(train) - 1) / (_CURVE_POINTS - 1)) for i in range(_CURVE_POINTS)})
        train = [train[i] for i in keep]
    return train, valid


def _num(value):
    """A JSON-safe float (None for missing or non-finite values)."""
    return round(float(value), 6) if isinstance(value, (int, float)) and math.isfinite(value) else None


def summary_line(records: dict, pending: int) -> str:
    counts = {s: sum(r["status"] == s for r in records.values()) for s in ("done", "nonfinite", "failed")}
    return (f"{len(records)} runs recorded ({counts['done']} done, {counts['nonfinite']} non-finite, "
            f"{counts['failed']} failed), {pending} to run")
