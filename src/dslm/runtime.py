"""Where a job runs: the device a ``--device`` name means, whether this process is the one that
writes (rank 0 of a torchrun job, or a plain process), and data-loader workers that leave the stop
signals to it."""
from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import weakref

import torch

from dslm.errors import UsageError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` -> CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is a usage error.
    ``local_rank`` picks the GPU of a multi-process job (default: torchrun's LOCAL_RANK, else 0)."""
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device {name!r}: expected auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda requested but no CUDA device is visible")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    return torch.device("cuda", index)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process started without one (RANK unset or empty)."""
    return os.environ.get("RANK", "0") in ("0", "")


def require_package(module: str, extra: str) -> None:
    """Stop with one line naming the extra to install when ``module`` is missing; called before a
    job's work starts, so a missing package never costs a finished training run."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"the '{module}' package is needed here: pip install 'dslm[{extra}]' (or pip install {module})")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _worker_leaves_stop_signals(worker_id: int) -> None:
    """A loader worker's init: ignore SIGTERM/SIGINT (PyTorch's worker handler would end the worker,
    and the main process's loader would then fail instead of checkpointing), then unblock them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


_WORKERS: weakref.WeakSet = weakref.WeakSet()   # every WorkerLoader worker process started here
_KILLER_REGISTERED = False


def _kill_stuck_workers() -> None:
    """At exit, SIGKILL the loader workers still alive. PyTorch ends a worker that does not stop when
    asked with SIGTERM, which these workers ignore; multiprocessing would then wait for it forever."""
    stuck = [worker for worker in list(_WORKERS) if worker.is_alive()]
    if stuck and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # PyTorch's handler would report the kill as a failure
    for worker in stuck:
        worker.kill()
        worker.join(timeout=5)


def _track_workers(iterator) -> None:
    global _KILLER_REGISTERED
    if not _KILLER_REGISTERED:      # registered after multiprocessing's own exit hook, so it runs first
        atexit.register(_kill_stuck_workers)
        _KILLER_REGISTERED = True
    _WORKERS.update(getattr(iterator, "_workers", ()))


class WorkerLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes leave SIGTERM/SIGINT to the main process, so that a signal
    sent to the whole process group (``timeout``, Slurm, Kubernetes) reaches only the training loop,
    which checkpoints and stops; the workers end when it drops the loader. The signals are blocked
    while the workers start, so none can arrive before a worker ignores them (a signal that arrives
    meanwhile is delivered to the main process when they are unblocked). A worker that is still busy
    when the process exits is killed (:func:`_kill_stuck_workers`), so exit never waits on it."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("num_workers", 0) > 0:
            kwargs.setdefault("worker_init_fn", _worker_leaves_stop_signals)
        super().__init__(*args, **kwargs)

    def __iter__(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super().__iter__()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            iterator = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        _track_workers(iterator)
        return iterator
