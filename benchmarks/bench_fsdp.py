"""Where FSDP2's time goes against DDP, with the engine's own step (``Trainer.train_step``:
``dslm.train.distributed.wrap``, bf16 autocast, ``clip_grad_norm``, the fused AdamW of
``build_optimizer``): BERT-base, L 512, a random batch per rank, one process per GPU under
torchrun, every variant in the same processes:

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_fsdp.py --out fsdp.json

Variants: ``ddp``; ``fsdp`` (the engine's: bf16 gathers, resharded after each block's forward);
``fsdp-keep`` (gathered parameters kept from forward to backward); ``fsdp-fp32`` (fp32 gathers).
Per variant: tokens/s over all ranks, the step's wall time and the host time spent issuing its
forward, backward, clipping and optimizer step (a host time close to the wall time means the step
is bound by Python / DTensor overhead, not by the GPU), peak memory. ``--device cpu`` (gloo) with
``--size tiny`` is a seconds-long smoke run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench_pretrain import BenchTask, make_batch
from dslm.model import BertConfig
from dslm.train import distributed as D
from dslm.train.engine import TrainConfig, Trainer

SIZES = {"bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, seq_len=512, batch=32),
         "tiny": dict(hidden_size=64, num_layers=4, num_heads=2, seq_len=32, batch=4)}
VARIANTS = ("ddp", "fsdp", "fsdp-keep", "fsdp-fp32")


class TimedTask(BenchTask):
    """The benchmark's pretraining task on one fixed batch per rank (:class:`bench_pretrain.BenchTask`,
    eager); it notes when its forward ends, for :class:`TimedTrainer`."""

    def __init__(self, config, seq_len):
        super().__init__(config, seq_len, "ours")
        self.forward_end = 0.0

    def loss_and_metrics(self, model, batch):
        out = super().loss_and_metrics(model, batch)
        self.forward_end = time.perf_counter()
        return out


class TimedTrainer(Trainer):
    """The engine's Trainer wrapped as ``variant`` says, adding the host time of each part of its
    steps to ``host`` while ``record`` is set: forward, backward, clip (with the non-finite check:
    up to the optimizer's step) and the optimizer (AdamW, zeroing the gradients, the metric sums)."""

    def __init__(self, task, cfg, env, variant):
        self.variant = variant       # read by wrap(), which the constructor calls
        super().__init__(task, cfg, env)
        self.host = {"forward": 0.0, "backward": 0.0, "clip": 0.0, "optimizer": 0.0}
        self.record = False
        self._adamw_start = 0.0
        self.optimizer.register_step_pre_hook(lambda *_: setattr(self, "_adamw_start", time.perf_counter()))

    def wrap(self, model):
        bf16 = self.cfg.precision == "bf16"
        return D.wrap(model, self.env, fsdp=self.variant != "ddp",
                      compute_dtype=torch.bfloat16 if bf16 and self.variant != "fsdp-fp32" else None,
                      reshard_after_forward=self.variant != "fsdp-keep")

    def micro_step(self, batch, last=True):
        t0 = time.perf_counter()
        super().micro_step(batch, last)
        if self.record:
            self.host["forward"] += self.task.forward_end - t0
            self.host["backward"] += time.perf_counter() - self.task.forward_end

    def optimizer_step(self):
        t0 = time.perf_counter()
        found = super().optimizer_step()
        if self.record:
            self.host["clip"] += self._adamw_start - t0
            self.host["optimizer"] += time.perf_counter() - self._adamw_start
        return found


def run_variant(variant, env, size, steps, warmup):
    s = SIZES[size]
    config = BertConfig(vocab_size=30522, hidden_size=s["hidden_size"], num_layers=s["num_layers"],
                        num_heads=s["num_heads"], max_position_embeddings=512)
    cfg = TrainConfig(out_dir=str(Path(tempfile.gettempdir()) / "bench_fsdp"), steps=10**9,
                      global_batch=s["batch"] * env.world_size, micro_batch=s["batch"], lr=1e-4, warmup=0,
                      weight_decay=0.01, clip=1.0, precision="bf16" if env.device.type == "cuda" else "fp32",
                      fsdp=variant != "ddp", device=env.device.type, seed=0,
                      progress=False)   # nothing is written unless a step is non-finite
    trainer = TimedTrainer(TimedTask(config, s["seq_len"]), cfg, env, variant)
    batch = make_batch(s["batch"], s["seq_len"], config.vocab_size, env.device, seed=env.rank)

    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        trainer.train_step([batch])
    sync()
    D.barrier(env)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.record = True
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step([batch])
    sync()
    wall = (time.perf_counter() - start) / steps
    tokens = s["batch"] * s["seq_len"] * env.world_size
    row = {"tokens_per_s": tokens / wall, "step_ms": wall * 1e3,
           "host_ms": {k: v / steps * 1e3 for k, v in trainer.host.items()},
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if env.device.type == "cuda" else None}
    del trainer
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--size", choices=list(SIZES), default="bert-base")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default="bench_fsdp.json")
    args = p.parse_args()
    env = D.setup(args.device)
    if env.device.type == "cpu":
        torch.set_num_threads(1)
    record = {"device": torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu",
              "world_size": env.world_size, "torch": torch.__version__, "size": args.size, "variants": {}}
    for variant in args.variants:
        row = run_variant(variant, env, args.size, args.steps, args.warmup)
        record["variants"][variant] = row
        if env.is_main:
            host = " ".join(f"{k} {v:.1f}" for k, v in row["host_ms"].items())
            print(f"{variant:10s} {row['tokens_per_s'] / 1e3:8.1f}k tok/s  step {row['step_ms']:6.1f} ms  "
                  f"host ms: {host}  peak {row['peak_mem_gib'] or 0:.2f} GiB", flush=True)
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
    D.cleanup()


if __name__ == "__main__":
    main()
