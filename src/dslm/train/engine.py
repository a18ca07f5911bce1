"""The training loop shared by pretraining and finetuning: :func:`train` runs a :class:`~dslm.train.task.Task`
through a :class:`Trainer`, whose steps (:meth:`~Trainer.train_step`, :meth:`~Trainer.evaluate`,
:meth:`~Trainer.save`, :meth:`~Trainer.load`) another loop or a benchmark can call as well.

One optimizer step consumes the global batch ``global_batch`` as ``accum = global_batch /
(micro_batch * world_size)`` micro-batches per rank; each micro-batch's loss (a mean over the
micro-batch) is divided by ``accum`` and back-propagated, DDP all-reduces (averages) the gradients
on the last micro-step only, so the update is the mean of the micro-batch means over all ranks and
micro-steps -- independent of how the global batch is split. Then: global-norm clipping, AdamW
(fused; fp32 master weights under bf16 autocast), the warmup + linear-decay schedule.

Nothing reads a device value back per micro-step or per step: metric sums stay on the device and are
all-reduced once per ``log_every`` steps; a step whose gradient norm is not finite (NaN/inf loss or
gradient) is skipped inside the fused optimizer kernel (``found_inf``), and the host learns about it
one step later through a pinned copy and a CUDA event, without stalling the GPU queue. After
``max_bad_steps`` skipped steps in a row the run writes a checkpoint (its weights are those of the
last good update) and raises :class:`NonFiniteLoss`.

SIGTERM / SIGINT, to the process or its whole group (loader workers leave them to this process):
the current step finishes, or an evaluation ends at its next batch (one process), a checkpoint is
written and the run returns with ``stopped`` set; one that arrives during the final save waits for
it and the run ends complete (a second SIGINT interrupts at once). Evaluation runs on the task's eval datasets every ``eval_every`` steps
(those not named ``test``) and on all of them at the end, with the RNG state forked so that it never
changes the training stream; a resumed run is therefore bit-identical to an uninterrupted one on
the CPU in fp32.

MFU = tokens/s x FLOPs per token / (peak FLOP/s x GPUs). FLOPs per token come from the task
(``flops_per_token(model)``; for BERT see :func:`dslm.model.flops.bert_flops_per_token`), peak
is bf16 dense tensor throughput (H100/H200 989, A100 312 TFLOP/s) or ``--peak-tflops``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from dslm.files import copy_atomic
from dslm.errors import ConfigError, UsageError
from dslm.train import checkpoint as ckpt_io
from dslm.train import distributed as D
from dslm.train.loader import default_loader
from dslm.train.logging import METRICS_FILE, TB_DIR, RunLogger
from dslm.train.graphs import GraphedStep
from dslm.train.optim import build_optimizer, clip_grad_norm, skip_if_nonfinite
from dslm.train.precision import PRECISIONS, autocast
from dslm.train.schedule import build_scheduler, warmup_steps


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainConfig:
    out_dir: str = "outputs/train"
    steps: int | None = None            # optimizer steps; or derived from epochs
    epochs: float | None = None
    global_batch: int = 256
    micro_batch: int | None = None      # per rank; None -> global_batch / world_size
    lr: float = 1e-4
    warmup: float = 0.01                # fraction of the steps if < 1, else steps
    weight_decay: float = 0.01
    clip: float = 1.0                   # global gradient norm; <= 0 disables
    precision: str = "bf16"             # "bf16" | "fp32"
    compile: bool = False
    cuda_graphs: bool = False           # capture the micro-step and the optimizer step as CUDA graphs
    eval_every: int = 4000              # steps; 0 = only at the end
    eval_iters: int | None = 50         # global batches per eval dataset (as in Megatron); None = all
    save_every: int = 50000             # steps; 0 = only at the end
    keep_last: int = 2
    load: str | None = None
    overwrite: bool = False             # replace a run already in out_dir (else that is an error)
    seed: int = 1234
    log_every: int = 10
    num_workers: int = 2
    fsdp: bool = False
    max_bad_steps: int = 10
    device: str = "auto"                # "auto" | "cpu" | "cuda"
    # optional extras
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    progress: bool = True
    peak_tflops: float | None = None
    eval_batch: int | None = None       # per rank; None -> micro_batch
    save_final: bool = True             # checkpoint at the end of the run
    stop_at: int | None = None          # stop (with a checkpoint) after this step, e.g. to split a run into jobs


_HELP = {
    "out_dir": "directory for checkpoints, metrics.jsonl and TensorBoard logs",
    "steps": "optimizer steps (default: from --epochs)",
    "epochs": "passes over the training data (used when --steps is not given)",
    "global_batch": "sequences per optimizer step, over all ranks and micro-steps",
    "micro_batch": "sequences per forward pass per rank (default: global batch / ranks); gradient "
                   "accumulation makes up the rest",
    "lr": "peak learning rate",
    "warmup": "linear warmup: a fraction of the steps if < 1, else a number of steps",
    "weight_decay": "decoupled AdamW weight decay (not on biases and LayerNorm)",
    "clip": "global gradient-norm clipping (<= 0: off)",
    "precision": "bf16 autocast with fp32 master weights, or fp32",
    "compile": "torch.compile the transformer blocks and the loss",
    "cuda_graphs": "after 3 eager steps, replay each micro-step and optimizer step as a CUDA graph (one GPU, "
                   "fixed batch shapes): removes the launch overhead that bounds deep narrow models",
    "eval_every": "evaluate every N steps (0: only at the end)",
    "eval_iters": "global batches per evaluation set, the same samples for any number of ranks or micro-batch "
                  "size ('all' for a full pass)",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "keep_last": "checkpoints to keep",
    "load": "resume from a checkpoint (or the newest one in a run directory)",
    "overwrite": "start afresh in an --out-dir that holds another run, deleting its checkpoints, metrics "
                 "and TensorBoard logs (without it that is an error: resume it with --load or pick another "
                 "--out-dir)",
    "seed": "random seed",
    "log_every": "log every N steps",
    "num_workers": "background data-loader processes per rank",
    "fsdp": "shard parameters, gradients and optimizer state with FSDP2 instead of DDP",
    "max_bad_steps": "stop after this many consecutive steps with a non-finite loss or gradient",
    "device": "auto (CUDA if available), cpu or cuda",
    "adam_beta1": "AdamW beta1", "adam_beta2": "AdamW beta2", "adam_eps": "AdamW epsilon",
    "progress": "show a progress bar",
    "peak_tflops": "peak FLOP/s per device for MFU (default: known GPUs in bf16)",
    "eval_batch": "sequences per evaluation batch per rank (default: the micro-batch)",
    "save_final": "write a checkpoint at the end of the run",
    "stop_at": "stop with a checkpoint after this step (resume later with --load)",
}


def _eval_iters(value: str):
    if value.lower() in ("all", "none"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {n}")
    return n


def add_train_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None,
                        exclude: tuple[str, ...] = ()) -> None:
    """One flag per :class:`TrainConfig` field (``--out-dir``, ``--global-batch``, ...); ``defaults``
    overrides the dataclass defaults (a job's recipe); ``exclude`` names fields a job does not offer
    (they keep their dataclass defaults)."""
    base = asdict(TrainConfig())
    base.update(defaults or {})
    group = parser.add_argument_group("training")
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default, help_text = base[f.name], _HELP[f.name]
        if f.name in ("compile", "cuda_graphs", "fsdp", "progress", "save_final", "overwrite"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.name == "precision":
            group.add_argument(flag, choices=PRECISIONS, default=default, help=help_text)
        elif f.name == "device":
            group.add_argument(flag, choices=("auto", "cpu", "cuda"), default=default, help=help_text)
        elif f.name == "eval_iters":
            group.add_argument(flag, type=_eval_iters, default=default, metavar="N", help=help_text)
        elif f.name in ("out_dir", "load"):
            group.add_argument(flag, default=default, metavar="DIR", help=help_text)
        else:
            kind = float if f.name in ("epochs", "lr", "warmup", "weight_decay", "clip", "adam_beta1",
                                       "adam_beta2", "adam_eps", "peak_tflops") else int
            group.add_argument(flag, type=kind, default=default, help=help_text)


def train_config_from_args(args) -> TrainConfig:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    validate(cfg)
    return cfg


RUN_FILES = ("checkpoints", METRICS_FILE, TB_DIR, "final_metrics.json")


def claim_run_dir(out_dir: Path, overwrite: bool) -> None:
    """A fresh run owns ``out_dir``: one that already holds another run's checkpoints or metrics is
    refused (a fresh run there would prune the old checkpoints by step number and mix the two
    metric streams); with ``overwrite`` that run's files are deleted first. Rank 0 only (the other
    ranks would see rank 0's first files)."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"{{out_dir}} {out_dir} already holds a run ({', '.join(found)}); resume it with {{load}} "
                          f"{out_dir}, choose another {{out_dir}}, or pass {{overwrite}} to replace it")
    for name in found:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def exit_status(result: dict) -> int:
    """The process exit status of a finished ``train`` result: 128 + the signal's number when a
    signal stopped it (the run is checkpointed, not finished: a ``&&`` chain must not go on), else 0
    (``--stop-at`` is a planned stop)."""
    stopped = result.get("stopped")
    if isinstance(stopped, str) and stopped.startswith("SIG"):
        return 128 + int(signal.Signals[stopped])
    return 0


def validate(cfg: TrainConfig) -> None:
    """Raise a one-line :class:`ConfigError` naming the field of an impossible value."""
    def bad(field, msg):
        raise ConfigError(f"{{{field}}} {msg}")

    if cfg.steps is None and cfg.epochs is None:
        bad("steps", "or {epochs} is required")
    if cfg.steps is not None and cfg.steps < 1:
        bad("steps", f"{cfg.steps}: must be >= 1")
    if cfg.epochs is not None and not cfg.epochs > 0:
        bad("epochs", f"{cfg.epochs}: must be > 0")
    if cfg.global_batch < 1:
        bad("global_batch", f"{cfg.global_batch}: must be >= 1")
    if cfg.micro_batch is not None and cfg.micro_batch < 1:
        bad("micro_batch", f"{cfg.micro_batch}: must be >= 1")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        bad("lr", f"{cfg.lr}: must be a positive number")
    if cfg.warmup < 0:
        bad("warmup", f"{cfg.warmup}: must be >= 0")
    if cfg.weight_decay < 0:
        bad("weight_decay", f"{cfg.weight_decay}: must be >= 0")
    if cfg.precision not in PRECISIONS:
        bad("precision", f"{cfg.precision!r}: expected one of {', '.join(PRECISIONS)}")
    for name in ("eval_every", "save_every", "num_workers"):
        if getattr(cfg, name) < 0:
            bad(name, f"{getattr(cfg, name)}: must be >= 0")
    # keep_last 0 would delete every checkpoint it writes; eval_batch 0 and stop_at 0 mean nothing
    for name in ("log_every", "max_bad_steps", "keep_last", "eval_batch", "stop_at"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            bad(name, f"{value}: must be >= 1")
    if cfg.eval_iters is not None and cfg.eval_iters < 1:
        bad("eval_iters", f"{cfg.eval_iters}: must be >= 1 or 'all'")
    if cfg.device not in ("auto", "cpu", "cuda"):
        bad("device", f"{cfg.device!r}: expected auto, cpu or cuda")
    if cfg.cuda_graphs and cfg.compile:
        bad("cuda_graphs", "cannot be combined with {compile} (capturing Inductor's random-number kernels in a "
                           "CUDA graph fails); use one of them")
    if cfg.peak_tflops is not None and not (cfg.peak_tflops > 0 and math.isfinite(cfg.peak_tflops)):
        bad("peak_tflops", f"{cfg.peak_tflops}: must be a positive number")
    if not (0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1 and cfg.adam_eps > 0):
        bad("adam_beta1", "and {adam_beta2} must be in [0, 1), {adam_eps} > 0")


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak dense FLOP/s of one device for MFU, or None when unknown (CPU, fp32 on an unknown GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0),
                        ("L40S", 362.0), ("A10", 125.0)):
        if key in name:
            return tflops * 1e12
    return None


# ---------------------------------------------------------------------------------------------
def _dist_info(model) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device if not hasattr(p, "to_local") else p.to_local().device
    return torch.device("cpu")


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _make_loader(task, dataset, batch_size, rank, world, start_step, num_steps, train, cfg, device):
    if hasattr(task, "make_loader"):
        return task.make_loader(dataset, batch_size, rank, world, start_step, num_steps, train)
    return default_loader(dataset, batch_size, rank, world, start_step, num_steps, train,
                          num_workers=cfg.num_workers, seed=cfg.seed, pin_memory=device.type == "cuda")


def _stack(metrics: dict, keys: list[str], device) -> torch.Tensor:
    return torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).to(device)


class EvaluationInterrupted(Exception):
    """:func:`evaluate` stopped before its last batch because ``interrupted()`` said so."""


def evaluate(task, model, datasets: dict, cfg: TrainConfig,
             interrupted: Callable[[], bool] | None = None) -> dict[str, dict[str, float]]:
    """Summaries of the task's metrics on each dataset (all ranks take part; every rank gets them).
    At most ``cfg.eval_iters`` global batches (``eval_iters * global_batch`` items, whatever the
    number of ranks), read in batches of ``cfg.eval_batch or cfg.micro_batch`` per rank.
    ``interrupted`` (one process only: ranks must run the same forwards) is asked before every
    batch; when it returns True the pass ends with :class:`EvaluationInterrupted`."""
    rank, world = _dist_info(model)
    device = _device_of(model)
    batch_size = cfg.eval_batch or cfg.micro_batch or max(1, cfg.global_batch // world)
    iters = None if cfg.eval_iters is None else max(1, cfg.eval_iters * (cfg.global_batch // world) // batch_size)
    was_training = model.training
    model.eval()
    results = {}
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=fork_devices):
            for name, dataset in datasets.items():
                keys, total, last, n_batches = None, None, None, 0
                batches = _make_loader(task, dataset, batch_size, rank, world, 0, iters, False, cfg, device)
                fsdp = world > 1 and getattr(model, "dslm_fsdp", False)
                if fsdp:   # every forward is collective: agree on the number of batches first
                    batches = batches if hasattr(batches, "__len__") else list(batches)
                    most = _max_over_ranks(len(batches), device)
                for batch in batches:
                    if interrupted is not None and interrupted():
                        raise EvaluationInterrupted(name)
                    batch = _to_device(batch, device)
                    with autocast(device, cfg.precision):
                        loss, metrics = task.loss_and_metrics(model, batch)
                    if keys is None:
                        keys = sorted(metrics)
                        total = torch.zeros(len(keys) + 2, device=device, dtype=torch.float64)
                    items = float(_batch_items(batch))   # the fallback loss is a per-item mean
                    vec = torch.cat([_stack(metrics, keys, device), loss.detach().float().reshape(1) * items,
                                     torch.full((1,), items, device=device)])
                    total += vec.double()
                    last, n_batches = batch, n_batches + 1
                if fsdp:
                    _repeat_forwards(task, model, last, most - n_batches, device, cfg)
                if keys is None:  # this rank got no batch: ask the others for the key set
                    keys = sorted(D.broadcast_object(None, D.DistEnv(rank, world)) or [])
                    total = torch.zeros(len(keys) + 2, device=device, dtype=torch.float64)
                elif world > 1:
                    D.broadcast_object(keys, D.DistEnv(rank, world))
                if world > 1:
                    dist.all_reduce(total)
                values = total.tolist()
                sums = dict(zip(keys, values[:-2]))
                summary = dict(task.summarize(sums))
                if values[-1] > 0:
                    summary.setdefault("loss", values[-2] / values[-1])
                results[name] = summary
    finally:
        model.train(was_training)
    return results


def _batch_items(batch: dict) -> int:
    """Number of items (rows) in a batch: the leading size of its first tensor."""
    return next(v for v in batch.values() if torch.is_tensor(v)).shape[0]


def _max_over_ranks(n: int, device) -> int:
    count = torch.tensor([n], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def _repeat_forwards(task, model, last, missing: int, device, cfg) -> None:
    """Under FSDP every forward all-gathers the sharded weights, so all ranks must run the same
    number of forwards: a rank with fewer eval batches repeats its last one (results dropped)."""
    if missing and last is None:
        raise RuntimeError("an eval split has fewer items than ranks; FSDP needs every rank to get one")
    for _ in range(missing):
        with autocast(device, cfg.precision):
            task.loss_and_metrics(model, last)


class _Signals:
    """SIGTERM/SIGINT set a flag (the loop checkpoints and returns); a second SIGINT interrupts."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Lagged:
    """Reads a small device vector one step late: copy to pinned memory + event now, read next time."""

    def __init__(self, device):
        self.device = device
        self.pending = None

    def push(self, step: int, vec: torch.Tensor):
        if self.device.type != "cuda":
            self.pending = (step, vec.detach().clone(), None)
            return
        host = torch.empty(vec.shape, dtype=vec.dtype, pin_memory=True)
        host.copy_(vec.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (step, host, event)

    def pop(self):
        if self.pending is None:
            return None
        step, host, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return step, host.tolist()


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on ``device`` (a GPU's total, or the machine's physical memory), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(task, device: torch.device, shards: int = 1) -> None:
    """Refuse, before anything is built, a model whose fp32 weights, gradients and two AdamW moments
    (16 bytes per parameter, split over ``shards`` FSDP ranks) alone exceed the device's memory: a
    lower bound on the peak, activations come on top. Needs the task's optional ``parameter_count()``."""
    count = getattr(task, "parameter_count", None)
    limit = device_memory(device) if count is not None else None
    if not limit:
        return
    n = count()
    need = 16 * n / shards
    if need > limit:
        raise UsageError(f"the model has {n / 1e6:,.0f}M parameters: its weights, gradients and AdamW state alone "
                         f"need {need / 2**30:,.1f} GiB (16 bytes each), more than the {limit / 2**30:,.1f} GiB of "
                         f"{device.type}; choose smaller sizes (layers, width)")


def _accumulation(cfg: TrainConfig, world: int) -> tuple[int, int]:
    micro = cfg.micro_batch or max(1, cfg.global_batch // world)
    if cfg.global_batch % (micro * world):
        raise ConfigError(f"{{global_batch}} {cfg.global_batch} is not a multiple of {{micro_batch}} {micro} x "
                          f"{world} ranks")
    return micro, cfg.global_batch // (micro * world)


def _total_steps(cfg: TrainConfig, dataset) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * len(dataset) / cfg.global_batch))


def _compile(task, model):
    if hasattr(task, "compile_model"):
        task.compile_model(model)
        return
    blocks = D.repeated_blocks(model)
    if blocks:
        for block in blocks:
            block.compile()
    else:
        model.compile()


def train(task, cfg: TrainConfig) -> dict:
    """Run ``task`` as configured (one process, or every rank under torchrun). Returns the final
    metrics ``{"train": ..., "eval": {name: summary}, "steps": .., "tokens_per_s": .., ...}``."""
    validate(cfg)
    env = D.setup(cfg.device)
    try:
        return Trainer(task, cfg, env).fit()
    finally:
        D.cleanup()


def _seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# the engine's own interval sums, after the task's metrics (Trainer._interval)
_ENGINE_KEYS = ("loss_sum", "micro_steps", "grad_norm_sum", "good_steps", "steps")


class Trainer:
    """One training run of ``task`` under ``cfg`` on ``env`` (from :func:`dslm.train.distributed.setup`),
    as steps that any loop can call; :meth:`fit` is the engine's own loop, the one :func:`train` runs.

    Construction seeds ``cfg.seed`` (every rank starts from the same weights), builds the model,
    compiles it (``cfg.compile``: the task's ``compile_model`` or each repeated block), wraps it
    (:meth:`wrap`), builds the fused AdamW and the warmup + decay schedule for ``total`` steps and
    restores ``cfg.load`` if given. A loop of one's own then calls :meth:`train_batches` once and
    :meth:`train_step` per optimizer step; :meth:`train_metrics`, :meth:`evaluate` and :meth:`save`
    whenever it wants them. Nothing is written to ``cfg.out_dir`` until something is logged or saved.

    Public state: ``model`` (wrapped), ``optimizer``, ``scheduler``, ``step`` (optimizer steps done),
    ``total`` (steps planned), ``micro`` and ``accum`` (micro-batch size per rank, micro-steps per
    step), ``skipped`` and ``consecutive`` (non-finite steps in all and in a row, counted one step
    late), ``last_checkpoint``.
    """

    def __init__(self, task, cfg: TrainConfig, env: D.DistEnv):
        validate(cfg)
        self.task, self.cfg, self.env = task, cfg, env
        self.device, self.world = env.device, env.world_size
        self.micro, self.accum = _accumulation(cfg, self.world)
        if cfg.cuda_graphs and (self.device.type != "cuda" or self.world > 1 or cfg.fsdp):
            raise ConfigError("{cuda_graphs} needs one process on a CUDA device (no {fsdp}, no torchrun ranks); "
                              f"this run has {self.world} x {self.device.type}{' with fsdp' if cfg.fsdp else ''}")
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"

        check_memory(task, self.device, self.world if cfg.fsdp else 1)
        _seed(cfg.seed)  # same initial weights on every rank
        model = task.build_model()
        if cfg.compile:
            _compile(task, model)
        self.model = self.wrap(model)
        self.train_ds = task.train_dataset()
        self.eval_sets = task.eval_datasets() or {}
        self.total = _total_steps(cfg, self.train_ds)
        inner = D.unwrap(self.model)
        self.optimizer = build_optimizer(inner, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                                         cfg.adam_eps, fused=True if self.device.type in ("cuda", "cpu") else None)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps(cfg.warmup, self.total), self.total)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        model_config = None
        if hasattr(task, "config_dict"):
            model_config = task.config_dict()
        elif hasattr(getattr(inner, "config", None), "to_dict"):
            model_config = inner.config.to_dict()
        self.meta = {"task": task.name, "model_config": model_config, "global_batch": cfg.global_batch,
                     "total_steps": self.total, "train_config": asdict(cfg)}
        self._flops_per_token = task.flops_per_token(inner) if hasattr(task, "flops_per_token") else None
        self._peak = peak_flops(self.device, cfg.precision, cfg.peak_tflops)

        self.step, self.skipped, self.consecutive = 0, 0, 0
        self._owns_out_dir = False       # a fresh run claims out_dir before it writes there (load: it resumes)
        self.last_checkpoint = None
        self._rng = None                 # the checkpoint's RNG state, restored by train_batches
        self._log = None
        self._lagged = _Lagged(self.device)
        self._keys = None                # the task's metric names, known after the first micro-step
        self._step_acc = None            # this step's metric sums over its micro-steps (device)
        self._interval = None            # sums since the last train_metrics (device)
        self._tokens_per_step = None
        self._t_interval, self._interval_tokens, self._eval_time = time.perf_counter(), 0, 0.0
        self._run_tokens, self._run_time, self._first_interval = 0, 0.0, True
        self._graphed = (GraphedStep(self.optimizer, self.micro_step, self.optimizer_step)
                         if cfg.cuda_graphs else None)
        if cfg.load:
            self.load(cfg.load)

    # ------------------------------------------------------------------------- construction
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to the device and wrap it for data parallelism: DDP, or FSDP2 with
        ``--fsdp`` (parameters gathered in bf16 under ``--precision bf16``). A subclass may wrap
        differently (the FSDP benchmark compares gather dtypes and resharding)."""
        return D.wrap(model, self.env, self.cfg.fsdp, torch.bfloat16 if self.cfg.precision == "bf16" else None)

    def load(self, path: str | Path) -> int:
        """Restore a checkpoint (a step directory, or a run directory: its newest): weights, optimizer,
        schedule, the skipped-step counters, and the RNG state (put back by :meth:`train_batches`, so
        the resumed run draws what the uninterrupted one would). Refuses a checkpoint of another
        task, model or global batch, one past the planned steps, and one older than a checkpoint
        already in ``out_dir`` (continuing it would let keep-last prune the newer timeline).
        Returns the checkpoint's step."""
        expected = {k: self.meta[k] for k in ("task", "model_config", "global_batch")}
        path, saved, state = ckpt_io.load(path, self.model, self.optimizer, self.scheduler, self.env, expected)
        start, counters = int(saved["step"]), state.get("counters", {})
        if start > self.total:
            raise ConfigError(f"{{load}} {path}: checkpoint is at step {start}, past {{steps}} {self.total}")
        newer = [p for p in ckpt_io.step_dirs(self.ckpt_root) if int(p.name[5:]) > start]
        if newer:
            raise ConfigError(f"{{load}} {path}: {self.ckpt_root} already holds a later checkpoint ({newer[-1].name}); "
                              "load that one, or write this run to another {out_dir}")
        self.step, self._rng = start, state.get("rng")
        self.skipped, self.consecutive = counters.get("skipped", 0), counters.get("consecutive", 0)
        self._owns_out_dir = True
        return start

    def _claim_out_dir(self) -> None:
        """Before the first write: a fresh run refuses (or, with ``overwrite``, clears) an ``out_dir``
        that holds another run (:func:`claim_run_dir`), then copies the task's ``run_files`` into it;
        a loaded one continues its own."""
        if not self._owns_out_dir:
            if self.env.is_main:
                claim_run_dir(self.out_dir, self.cfg.overwrite)
                self.out_dir.mkdir(parents=True, exist_ok=True)
                for name, source in getattr(self.task, "run_files", dict)().items():
                    copy_atomic(Path(source), self.out_dir / name)
            self._owns_out_dir = True

    @property
    def log(self) -> RunLogger:
        """The run's logger (metrics.jsonl, TensorBoard, progress bar in ``out_dir``; rank 0 only),
        opened on first use at the current step, so a resumed run drops the records its
        predecessor wrote after the checkpoint."""
        if self._log is None:
            self._claim_out_dir()
            self._log = RunLogger(self.out_dir, self.env.is_main, self.total, self.step, progress=self.cfg.progress)
        return self._log

    # ------------------------------------------------------------------------- one step
    def train_batches(self):
        """The iterator of training micro-batches from the current step on (``accum`` per step; this
        rank's share), made once before the first :meth:`train_step`. It also seeds the dropout
        stream per rank -- or restores a loaded checkpoint's RNG state -- after creating the loader
        (which draws from torch's generator), so steps taken from it are those of :meth:`fit`."""
        loader = _make_loader(self.task, self.train_ds, self.micro, self.env.rank, self.world, self.step * self.accum,
                              self.total * self.accum, True, self.cfg, self.device)
        batches = iter(loader)
        if self._rng is not None:
            ckpt_io.set_rng_state(self._rng)
        else:
            _seed(self.cfg.seed * 1009 + 17 + self.env.rank)
        self._t_interval = time.perf_counter()
        return batches

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over the next ``accum`` micro-batches of ``batches`` (an iterator such as
        :meth:`train_batches`, or a list of ``accum`` batches): forward + backward of each
        (:meth:`micro_step`, gradients all-reduced on the last one only), then :meth:`optimizer_step`
        and the schedule -- replayed as CUDA graphs after the warmup steps under ``cfg.cuda_graphs``.
        The non-finite flag of the previous step is read now (one step late, so the host never
        waits for the GPU) and counted in ``skipped`` / ``consecutive``. Returns this step's flag,
        a 0-dim device tensor (1 = skipped)."""
        batches = iter(batches)
        for a in range(self.accum):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"the training loader ended at step {self.step} "
                                   f"(expected {self.total} steps)") from None
            if self._tokens_per_step is None:
                ids = batch.get("input_ids")
                per_item = getattr(self.task, "tokens_per_item", None) or (ids.shape[-1] if ids is not None else 1)
                self._tokens_per_step = self.cfg.global_batch * per_item
            if self._graphed is not None:
                self._graphed.micro_step(batch)
            else:
                self.micro_step(_to_device(batch, self.device), last=a == self.accum - 1)
        found = self._graphed.optimizer_step() if self._graphed is not None else self.optimizer_step()
        self.scheduler.step()
        self.step += 1
        self._interval_tokens += self._tokens_per_step

        # the previous step's flag (its kernels are done or nearly; this one's stay queued)
        previous = self._lagged.pop()
        self._lagged.push(self.step, found.reshape(1))
        for item in ([previous] if previous else []) + ([self._lagged.pop()] if self.step == self.total else []):
            self._account(item)
        return found

    def micro_step(self, batch: dict, last: bool = True) -> None:
        """Forward + backward of one micro-batch (on the device) with the loss divided by ``accum``;
        its metric sums are added to this step's on the device. ``last=False`` skips the gradient
        all-reduce (DDP ``no_sync`` / FSDP2), which the last micro-step of a step does once."""
        model = self.model
        sync = contextlib.nullcontext()
        if self.world > 1 and not last:
            if hasattr(model, "no_sync"):
                sync = model.no_sync()
            elif hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(False)
        if self.world > 1 and last and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        with sync:
            with autocast(self.device, self.cfg.precision):
                loss, metrics = self.task.loss_and_metrics(model, batch)
            (loss / self.accum).backward()
        if self._keys is None:
            self._keys = sorted(metrics)
            self._interval = torch.zeros(len(self._keys) + len(_ENGINE_KEYS), device=self.device, dtype=torch.float64)
            self._step_acc = torch.zeros(len(self._keys) + 1, device=self.device, dtype=torch.float32)
        self._step_acc.add_(torch.cat([_stack(metrics, self._keys, self.device), loss.detach().float().reshape(1)]))

    def optimizer_step(self) -> torch.Tensor:
        """Clip, skip if non-finite, AdamW, zero the gradients; add the step to the interval sums.
        Returns the 0-dim non-finite flag (1 = skipped) on the device, without synchronising."""
        optimizer = self.optimizer
        grad_norm = clip_grad_norm(self.params, self.cfg.clip, optimizer)
        found = skip_if_nonfinite(optimizer, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=not self.cfg.cuda_graphs)   # graphs: persistent buffers, zeroed in place
        optimizer.found_inf = optimizer.grad_scale = None
        good = 1.0 - found
        gn = torch.where(found > 0, torch.zeros_like(grad_norm), grad_norm.float())
        # a skipped step's sums are dropped (where, not * 0: a NaN loss times 0 is still NaN)
        kept = torch.where(found > 0, torch.zeros_like(self._step_acc), self._step_acc).double()
        self._interval.add_(torch.cat([kept, torch.stack([good * self.accum, gn, good, torch.ones_like(good)]).double()]))
        self._step_acc.zero_()
        return found

    def _account(self, item) -> None:
        """Count one step's non-finite flag (read one step late, see _Lagged)."""
        s, (bad,) = item
        if bad:
            self.skipped += 1
            self.consecutive += 1
            self.log.print(f"step {s}: non-finite loss or gradient, step skipped ({self.consecutive} in a row)")
        else:
            self.consecutive = 0

    # ------------------------------------------------------------------------- metrics, eval, checkpoints
    def train_metrics(self) -> dict[str, float]:
        """The training metrics of the steps since the previous call, summed over their micro-steps and
        all ranks (every rank must call it; it reads the device once): the task's summary, the mean
        micro-batch ``loss``, ``lr``, ``grad_norm`` (mean over the steps not skipped), ``tokens_per_s``,
        ``skipped_steps``, ``tokens`` since step 0, ``mfu`` when known, ``peak_mem_gib`` on CUDA."""
        return self._interval_summary(signalled=False)[0]

    def _interval_summary(self, signalled: bool) -> tuple[dict[str, float], bool]:
        """:meth:`train_metrics`, with a stop request folded into the same all-reduce: also returns
        whether any rank was ``signalled``."""
        flag = torch.tensor([1.0 if signalled else 0.0], device=self.device, dtype=torch.float64)
        vec = torch.cat([self._interval, flag])
        if self.world > 1:
            dist.all_reduce(vec)
        values = vec.tolist()
        self._interval.zero_()
        now = time.perf_counter()
        elapsed = now - self._t_interval - self._eval_time
        tps = self._interval_tokens / elapsed if elapsed > 0 else float("nan")
        if not self._first_interval or self.step == self.total:   # the first interval includes warmup
            self._run_tokens += self._interval_tokens
            self._run_time += elapsed
        self._first_interval = False
        self._t_interval, self._interval_tokens, self._eval_time = now, 0, 0.0
        n = len(self._keys)
        sums = dict(zip(self._keys, values[:n]))
        loss_sum, micro_steps, gn_sum, good_steps, _ = values[n:n + len(_ENGINE_KEYS)]
        summary = dict(self.task.summarize(sums)) if good_steps > 0 else {}
        summary.setdefault("loss", loss_sum / micro_steps if micro_steps else float("nan"))
        summary.update(lr=self.scheduler.get_last_lr()[0],
                       grad_norm=gn_sum / good_steps if good_steps else float("nan"),
                       tokens_per_s=tps, skipped_steps=float(self.skipped),
                       tokens=float(self.step * self._tokens_per_step))   # seen since step 0
        if self._flops_per_token and self._peak:
            summary["mfu"] = tps * self._flops_per_token / (self._peak * self.world)
        if self.device.type == "cuda":
            summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return summary, values[-1] > 0

    def evaluate(self, datasets: dict | None = None) -> dict[str, dict[str, float]]:
        """The task's metric summaries on each of ``datasets`` (default: all the task's eval sets),
        :func:`evaluate` with this run's model and config: every rank takes part, the RNG state is
        left as it was, the model returns to training mode."""
        return evaluate(self.task, self.model, self.eval_sets if datasets is None else datasets, self.cfg)

    def save(self, step: int | None = None) -> Path | None:
        """Write a checkpoint labelled ``step`` (default: the current step) under ``out_dir/checkpoints``,
        keeping the newest ``keep_last``. The pending non-finite flag is counted first, so the saved
        counters include the newest step. Returns the path on rank 0 (None on the others)."""
        step = self.step if step is None else step
        self._claim_out_dir()
        pending = self._lagged.pop()
        if pending:
            self._account(pending)
        path = ckpt_io.save(self.ckpt_root, step, self.model, self.optimizer, self.scheduler, self.env, self.meta,
                            {"counters": {"skipped": self.skipped, "consecutive": self.consecutive}},
                            self.cfg.keep_last)
        if self.env.is_main:
            self.last_checkpoint = path
            self.log.print(f"step {step}: checkpoint {path}")
            return path
        return None

    # ------------------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train from the current step to ``total``: log every ``log_every`` steps, evaluate (all eval
        sets but ``test``) every ``eval_every`` and checkpoint every ``save_every`` steps, then the
        final evaluation on every eval set and the final checkpoint. Stops early, with a checkpoint,
        on SIGTERM/SIGINT, at ``stop_at``, or after ``max_bad_steps`` non-finite steps in a row
        (then raises :class:`NonFiniteLoss`). Returns the final metrics (see :func:`train`)."""
        self._claim_out_dir()
        self._announce()
        last_train, last_eval, stop = {}, {}, None
        self.model.train()
        # signal handlers first: loader workers forked by train_batches inherit them, so a SIGTERM sent
        # to the whole process group leaves them running until this process has written its checkpoint.
        # They stay until the end: a signal during the final evaluation or save is handled the same way.
        with _Signals() as signals:
            batches = self.train_batches()
            while self.step < self.total and not stop:
                self.train_step(batches)
                self.log.advance()
                stop, summary = self._after_step(signals)
                last_train = summary or last_train
                if not stop:
                    stop, last_eval = self._periodic_work(signals, last_eval)
            if stop:
                return self._stop(stop, signals.received, last_train, last_eval)
            final_eval = self._evaluate_unless_signalled(self.eval_sets, signals) if self.eval_sets else {}
            if final_eval is None:
                return self._stop("signal", signals.received, last_train, last_eval)
            for name, m in final_eval.items():
                self.log.log(self.total, name, m)
            if self.cfg.save_final:
                self.save()    # a signal now waits for the save; the run is then complete
        self.log.close()
        return self._result(last_train, final_eval)

    def _announce(self) -> None:
        """One line: the task, model size, devices, steps and batch layout."""
        if not self.env.is_main:
            return
        cfg = self.cfg
        n_params = sum(p.numel() for p in D.unwrap(self.model).parameters())
        self.log.print(f"{self.task.name}: {n_params / 1e6:.2f}M parameters, {self.world} x {self.device.type}, "
                       f"steps {self.step}->{self.total}, global batch {cfg.global_batch} = {self.micro} x "
                       f"{self.accum} accumulation x {self.world} ranks, {cfg.precision}"
                       f"{', compiled' if cfg.compile else ''}{', CUDA graphs' if cfg.cuda_graphs else ''}"
                       + (f", resumed from {cfg.load}" if cfg.load else ""))

    def _after_step(self, signals: "_Signals") -> tuple[str | None, dict | None]:
        """After a step: why the run must stop now (``nonfinite``, ``signal``, ``stop_at``; None to go
        on), and the logged training summary at a logging boundary or a stop (else None). Ranks agree
        on a signal through the summary's all-reduce."""
        cfg, step, stop = self.cfg, self.step, None
        if self.consecutive >= cfg.max_bad_steps:
            stop = "nonfinite"
        if self.world == 1 and signals.received:
            stop = stop or "signal"
        if cfg.stop_at is not None and cfg.stop_at <= step < self.total:
            stop = stop or "stop_at"
        if not (stop or step % cfg.log_every == 0 or step == self.total):
            return None, None
        summary, signalled = self._interval_summary(signals.received is not None)
        self.log.log(step, "train", summary)
        return stop or ("signal" if signalled else None), summary

    def _periodic_work(self, signals: "_Signals", last_eval: dict) -> tuple[str | None, dict]:
        """The evaluation and checkpoint due at this step (none at the last: the final ones follow).
        Returns ``("signal", ...)`` when a signal ended the evaluation, and the newest eval summaries."""
        cfg, step = self.cfg, self.step
        t0 = time.perf_counter()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total:
            evals = self._evaluate_unless_signalled({k: v for k, v in self.eval_sets.items() if k != "test"},
                                                    signals)
            if evals is None:
                return "signal", last_eval
            last_eval = evals
            for name, m in last_eval.items():
                self.log.log(step, name, m)
        if cfg.save_every and step % cfg.save_every == 0 and step < self.total:
            self.save()
        self._eval_time += time.perf_counter() - t0
        return None, last_eval

    def _evaluate_unless_signalled(self, datasets: dict, signals: "_Signals") -> dict | None:
        """:meth:`evaluate`, or None when a signal arrives during it (one process: the pass ends at the
        next batch; several ranks finish the pass together and stop at the next step)."""
        check = (lambda: signals.received is not None) if self.world == 1 else None
        try:
            return evaluate(self.task, self.model, datasets, self.cfg, interrupted=check)
        except EvaluationInterrupted:
            return None

    def _stop(self, why: str, received: str | None, last_train: dict, last_eval: dict) -> dict:
        """End the run early with a checkpoint; raise NonFiniteLoss when it stops for that."""
        self.save()
        self.log.close()
        if why == "nonfinite":
            where = self.last_checkpoint or "(written by rank 0)"
            raise NonFiniteLoss(f"stopped at step {self.step}: {self.consecutive} consecutive steps had a non-finite "
                                f"loss or gradient ({self.skipped} skipped in all); the last good weights are in {where}")
        reason = f"received {received}" if why == "signal" else f"--stop-at {self.cfg.stop_at}"
        if self.env.is_main:
            print(f"{reason}: stopped at step {self.step} after writing {self.last_checkpoint}; "
                  f"resume with --load {self.out_dir}", flush=True)
        return {**self._result(last_train, last_eval), "stopped": received or why}

    def _result(self, last_train: dict, evals: dict) -> dict:
        return {"train": last_train, "eval": evals, "steps": self.step,
                "tokens_per_s": self._run_tokens / self._run_time if self._run_time else None,
                "skipped_steps": self.skipped,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}

