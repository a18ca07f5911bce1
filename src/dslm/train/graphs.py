"""Whole-step CUDA graphs: replay a training step's kernels without the Python and launch overhead.

A narrow deep model (96 layers of d 256) issues thousands of small kernels per step; in eager mode
the GPU waits for the CPU to launch them. :class:`GraphedStep` captures the two halves of a
training step once and replays them from then on:

* the *micro-step* graph: forward (under autocast), backward of ``loss / accum`` accumulating into
  the parameters' ``.grad`` tensors, and the device-side metric sums;
* the *optimizer-step* graph: clipping, the non-finite check, fused AdamW, zeroing the gradients
  in place and the interval sums.

Both halves are the very closures the eager engine runs (one code path); capture only changes how
they are launched. What a graph needs, and how it is provided:

* static inputs: each batch is copied into device buffers captured by the graph (every batch must
  have the first one's fields, shapes and dtypes; anything else is a one-line error);
* persistent gradients: ``step_fn`` zeroes them in place (never sets them to ``None``), so the
  warmup steps leave every gradient the model produces allocated, and replaying the micro-step
  ``accum`` times accumulates into them;
* a learning rate the host can change: during capture each param group's ``lr`` is a device tensor
  (fused AdamW reads it from memory); after capture the groups hold floats again, the scheduler
  runs as usual, and :meth:`optimizer_step` copies the current value into the tensor before each
  replay;
* ``capturable=True`` for the capture (fused AdamW keeps its step counters on the device);
* dropout: PyTorch's graph-safe Philox offsets advance the CUDA generator on every replay, so each
  step draws fresh masks and checkpoints record the generator as usual.

The first ``warmup`` steps run eagerly on a side stream (real training steps: lazily created
optimizer state, cuBLAS workspaces and autograd buffers exist before capture); the graphs are
captured after them. One process only (no DDP/FSDP).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from dslm.errors import ConfigError


class GraphedStep:
    """Capture ``micro_step(batch)`` and ``optimizer_step() -> Tensor`` as two CUDA graphs.

    Usage per optimizer step::

        for batch in micro_batches:
            graphed.micro_step(batch)        # eager (warmup) or copy + replay
        found = graphed.optimizer_step()     # eager (warmup) or lr copy + replay
        scheduler.step()

    ``micro_fn`` and ``step_fn`` must not synchronise with the host and must keep their results in
    tensors that outlive the call (the engine's interval sums); ``step_fn`` returns a 0-dim tensor
    (the non-finite flag) which is copied into a persistent output after every replay.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, micro_fn: Callable[[dict], None], step_fn: Callable[[], torch.Tensor], warmup: int = 3):
        if not torch.cuda.is_available():
            raise ConfigError("{cuda_graphs} needs a CUDA device")
        if not optimizer.defaults.get("fused"):
            raise ConfigError("{cuda_graphs} needs the fused AdamW optimizer")
        self.optimizer = optimizer
        self.micro_fn, self.step_fn = micro_fn, step_fn
        self.warmup = max(1, warmup)
        self.eager_steps = 0
        self.side = torch.cuda.Stream()
        self.static_batch: dict | None = None
        self.micro_graph: torch.cuda.CUDAGraph | None = None
        self.step_graph: torch.cuda.CUDAGraph | None = None
        self.lr_tensors: list[torch.Tensor] = []
        self.found: torch.Tensor | None = None

    @property
    def captured(self) -> bool:
        return self.step_graph is not None

    @contextlib.contextmanager
    def _on_side_stream(self):
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream().wait_stream(self.side)

    # ----------------------------------------------------------------------------- per step
    def micro_step(self, batch: dict) -> None:
        if self.static_batch is None:
            if not all(torch.is_tensor(v) for v in batch.values()):
                raise ConfigError("{cuda_graphs} needs batches made only of tensors")
            self.static_batch = {k: torch.empty_like(v, device="cuda") for k, v in batch.items()}
        self._check(batch)
        if not self.captured:
            with self._on_side_stream():
                self.micro_fn(_to_cuda(batch))
            return
        for key, buf in self.static_batch.items():
            buf.copy_(batch[key], non_blocking=True)
        self.micro_graph.replay()

    def optimizer_step(self) -> torch.Tensor:
        if not self.captured:
            with self._on_side_stream():
                found = self.step_fn()
            self.eager_steps += 1
            if self.eager_steps >= self.warmup:
                self._capture()
            return found
        for group, lr in zip(self.optimizer.param_groups, self.lr_tensors):
            lr.fill_(float(group["lr"]))
        self.step_graph.replay()
        return self.found

    # ----------------------------------------------------------------------------- capture
    def _check(self, batch: dict) -> None:
        """Every batch must have the first one's keys, shapes and dtypes (the graph reads fixed buffers)."""
        if set(batch) != set(self.static_batch):
            raise ConfigError(f"{{cuda_graphs}} needs every batch to have the same fields: got {sorted(batch)}, "
                              f"the first batch had {sorted(self.static_batch)}")
        for key, buf in self.static_batch.items():
            src = batch[key]
            if not torch.is_tensor(src) or src.shape != buf.shape or src.dtype != buf.dtype:
                what = f"{tuple(src.shape)} {src.dtype}" if torch.is_tensor(src) else type(src).__name__
                raise ConfigError(f"{{cuda_graphs}} needs every batch to have the same shapes: {key} is {what}, "
                                  f"the first batch's {tuple(buf.shape)} {buf.dtype}")

    def _capture(self) -> None:
        torch.cuda.synchronize()
        groups = self.optimizer.param_groups
        saved = [(g["lr"], g["capturable"]) for g in groups]
        self.lr_tensors = [torch.tensor(float(g["lr"]), device="cuda", dtype=torch.float32) for g in groups]
        for g, lr in zip(groups, self.lr_tensors):
            g["lr"], g["capturable"] = lr, True
        try:
            # the captured kernels do not run: gradients, weights and optimizer state stay as they are
            self.micro_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.micro_graph, capture_error_mode="thread_local"):
                self.micro_fn(self.static_batch)
            step_graph = torch.cuda.CUDAGraph()
            self.found = torch.zeros((), device="cuda")
            with torch.cuda.graph(step_graph, capture_error_mode="thread_local"):
                self.found.copy_(self.step_fn())
            self.step_graph = step_graph
        finally:
            for g, (lr, capturable) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, capturable
        torch.cuda.synchronize()


def _to_cuda(batch: dict) -> dict:
    return {k: (v.to("cuda", non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
