"""Where FSDP2's time goes against DDP, with the engine's own pieces (``dslm.train.distributed.wrap``,
the fused AdamW of ``build_optimizer``, ``clip_grad_norm``, bf16 autocast): BERT-base, L 512, a
random batch per rank, one process per GPU under torchrun, every variant in the same processes:

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
import time

import torch

from bench_pretrain import make_batch
from dslm.model import BertConfig, BertForPreTraining
from dslm.train import distributed as D
from dslm.train.optim import build_optimizer, clip_grad_norm, skip_if_nonfinite
from dslm.train.precision import autocast
from dslm.train.pretrain import PretrainingObjective

SIZES = {"bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, seq_len=512, batch=32),
         "tiny": dict(hidden_size=64, num_layers=4, num_heads=2, seq_len=32, batch=4)}
VARIANTS = ("ddp", "fsdp", "fsdp-keep", "fsdp-fp32")


def run_variant(variant, env, size, steps, warmup):
    s = SIZES[size]
    config = BertConfig(vocab_size=30522, hidden_size=s["hidden_size"], num_layers=s["num_layers"],
                        num_heads=s["num_heads"], max_position_embeddings=512)
    torch.manual_seed(0)
    model = PretrainingObjective(BertForPreTraining(config), round(0.15 * s["seq_len"]))
    bf16 = env.device.type == "cuda"
    model = D.wrap(model, env, fsdp=variant != "ddp",
                   compute_dtype=torch.bfloat16 if bf16 and variant != "fsdp-fp32" else None,
                   reshard_after_forward=variant != "fsdp-keep")
    opt = build_optimizer(model, 1e-4, 0.01)
    params = list(model.parameters())
    batch = make_batch(s["batch"], s["seq_len"], config.vocab_size, env.device, seed=env.rank)
    host = {"forward": 0.0, "backward": 0.0, "clip": 0.0, "optimizer": 0.0}

    def step(record):
        t0 = time.perf_counter()
        with autocast(env.device, "bf16" if bf16 else "fp32"):
            loss, _ = model(**batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        norm = clip_grad_norm(params, 1.0, opt)
        t3 = time.perf_counter()
        skip_if_nonfinite(opt, norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        opt.found_inf = opt.grad_scale = None
        t4 = time.perf_counter()
        if record:
            for k, v in zip(host, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                host[k] += v

    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step(False)
    sync()
    D.barrier(env)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step(True)
    sync()
    wall = (time.perf_counter() - start) / steps
    tokens = s["batch"] * s["seq_len"] * env.world_size
    row = {"tokens_per_s": tokens / wall, "step_ms": wall * 1e3,
           "host_ms": {k: v / steps * 1e3 for k, v in host.items()},
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if env.device.type == "cuda" else None}
    del model, opt, params
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
