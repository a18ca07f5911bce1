"""Decoder pretraining throughput: dslm's engine step against HF transformers' GPT2LMHeadModel.

    python benchmarks/bench_gpt.py            # GPU: GPT-2 small (12 x 768, L 1024, batch 16) and
                                              # 96 x 256 (4 heads, L 256, batch 64), every variant
    python benchmarks/bench_gpt.py --smoke    # CPU-sized shapes, 2 timed steps: every variant runs

One optimizer step = forward + backward + global-norm clip (1.0) + fused AdamW (lr 1e-4, weight
decay 0.01), bf16 autocast with fp32 master weights, dropout 0.1, tied embeddings, vocabulary 50257,
the same batch of uniformly random token ids for both models. dslm runs the engine's own step,
``Trainer.train_step`` of :class:`dslm.pretrain.gpt.GPTPretrainTask` (its model, next-token loss and
``--compile`` policy; the non-finite skip, schedule and device-side metric sums included), through
``bench_pretrain.engine_step``; HF runs ``GPT2LMHeadModel`` (attn_implementation="sdpa", loss from
``labels``) through ``bench_pretrain.hf_step``. Variants: ``hf`` / ``ours`` eager, ``hf-compiled``
(``model.compile()``) / ``ours-compiled`` (the engine's ``--compile``), ``ours-graphs`` (the engine's
``--cuda-graphs``, GPU only). Timing: ``--steps`` steps after ``--warmup`` (which include
compilation and graph capture); CUDA events on a GPU, the wall clock on the CPU.

MFU = tokens/s x F / peak, F = :func:`dslm.model.flops.gpt_flops_per_token` (causal attention counted
at half the encoder's score/value work, the LM head on every position) for both models; peak from
:func:`dslm.train.engine.peak_flops` (bf16 dense; none on the CPU). All rows go to one JSON,
``OUT/gpt_throughput_<machine>.json`` (default OUT: benchmarks/results/pretrain, or
outputs/bench_gpt with --smoke), with the machine, versions and the exact command.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

from bench_pretrain import engine_step, hf_step, time_steps
from dslm.model import GPTConfig
from dslm.model.flops import gpt_flops_per_token
from dslm.pretrain.gpt import GPTPretrainTask
from dslm.train.engine import peak_flops

SIZES = {
    "gpt2-small": dict(num_layers=12, hidden_size=768, num_heads=12, seq_len=1024, batch=16, vocab_size=50257),
    "deep-narrow": dict(num_layers=96, hidden_size=256, num_heads=4, seq_len=256, batch=64, vocab_size=50257),
}
SMOKE_SIZES = {
    "smoke-small": dict(num_layers=2, hidden_size=64, num_heads=2, seq_len=64, batch=4, vocab_size=1000),
    "smoke-deep": dict(num_layers=8, hidden_size=32, num_heads=2, seq_len=32, batch=8, vocab_size=1000),
}
VARIANTS = ("hf", "ours", "ours-graphs", "ours-compiled", "hf-compiled")


class RandomBatchTask(GPTPretrainTask):
    """The decoder pretraining task without a dataset: the benchmark feeds the engine its own batch."""

    def __init__(self, config: GPTConfig, seq_len: int):
        super().__init__("-", config, seq_len, num_workers=0)

    def train_dataset(self):
        return []

    def eval_datasets(self):
        return {}


def config_of(size: dict) -> GPTConfig:
    return GPTConfig(vocab_size=size["vocab_size"], hidden_size=size["hidden_size"], num_layers=size["num_layers"],
                     num_heads=size["num_heads"], max_position_embeddings=size["seq_len"])


def random_batch(size: dict, device, seed: int = 0) -> dict:
    """``input_ids`` and next-token ``targets`` of random windows of seq_len + 1 token ids."""
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, size["vocab_size"], (size["batch"], size["seq_len"] + 1), generator=g)
    return {"input_ids": windows[:, :-1].contiguous().to(device), "targets": windows[:, 1:].contiguous().to(device)}


def hf_model(config: GPTConfig, device):
    """HF ``GPT2LMHeadModel`` of the same shape (converted config: :func:`dslm.model.hf_gpt2.gpt2_config_to_hf`)."""
    import transformers

    from dslm.model.hf_gpt2 import gpt2_config_to_hf

    hf_config = gpt2_config_to_hf(config)
    hf_config._attn_implementation = "sdpa"
    hf_config.bos_token_id = hf_config.eos_token_id = config.vocab_size - 1   # GPT-2's <|endoftext|> slot
    model = transformers.GPT2LMHeadModel(hf_config).to(device).train()
    assert model.config._attn_implementation == "sdpa"
    return model


def step_of(variant: str, config: GPTConfig, batch: dict, device):
    """A function running one training step of ``variant`` on ``batch``."""
    if variant.startswith("hf"):
        model = hf_model(config, device)
        if variant == "hf-compiled":
            model.compile()
        return hf_step(model, {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}, device)
    task = RandomBatchTask(config, batch["input_ids"].shape[1])
    return engine_step(task, batch, variant, str(device.type))[1]


def measure(variant: str, size: dict, device, warmup: int, steps: int) -> dict:
    """One row: step time, tokens/s, MFU, peak memory (GPU), or the error that stopped the variant."""
    if variant == "ours-graphs" and device.type != "cuda":
        return {"skipped": "CUDA graphs need a GPU"}
    config, batch = config_of(size), random_batch(size, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    t0 = time.time()
    try:
        sec = time_steps(step_of(variant, config, batch, device), warmup, steps, device)
    except Exception as e:  # noqa: BLE001 - record it and go on with the other variants
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    tps = size["batch"] * size["seq_len"] / sec
    peak = peak_flops(device, "bf16")
    row = {"step_ms": sec * 1e3, "tokens_per_s": tps, "mfu": tps * gpt_flops_per_token(config, size["seq_len"]) / peak
           if peak else None, "wall_s_incl_warmup": time.time() - t0}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def add_ratios(row: dict) -> None:
    """dslm's rows against HF eager (and compiled against compiled)."""
    def tps(key):
        return row.get(key, {}).get("tokens_per_s")

    for key in [k for k in VARIANTS if k.startswith("ours") and tps(k)]:
        if tps("hf"):
            row[key]["speedup_vs_hf"] = tps(key) / tps("hf")
        if tps("hf-compiled"):
            row[key]["speedup_vs_hf_compiled"] = tps(key) / tps("hf-compiled")


def machine() -> tuple[str, str]:
    """(the device's name, a short slug for the file name: h100, h200, ... or cpu)."""
    if not torch.cuda.is_available():
        return platform.processor() or platform.machine() or "cpu", "cpu"
    name = torch.cuda.get_device_name()
    known = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", name)
    return name, (known.group(1) if known else re.sub(r"[^a-z0-9]+", "_", name.lower())).lower()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized shapes and 1 + 2 steps: check that everything runs")
    p.add_argument("--sizes", nargs="+", default=None, help=f"of {', '.join([*SIZES, *SMOKE_SIZES])}")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --smoke 2)")
    p.add_argument("--out", default=None, help="folder of the JSON (default benchmarks/results/pretrain; "
                                               "--smoke: outputs/bench_gpt)")
    args = p.parse_args(argv)
    table = SMOKE_SIZES if args.smoke else SIZES
    sizes = args.sizes or list(table)
    unknown = [s for s in sizes if s not in {**SIZES, **SMOKE_SIZES}]
    if unknown:
        p.error(f"--sizes {unknown[0]}: expected one of {', '.join([*SIZES, *SMOKE_SIZES])}")
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    steps = args.steps if args.steps is not None else (2 if args.smoke else 20)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    name, slug = machine()
    import transformers

    result = {"benchmark": "gpt pretraining throughput, dslm engine step vs HF GPT2LMHeadModel", "machine": name,
              "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
              "python": platform.python_version(), "command": " ".join(["python", "benchmarks/bench_gpt.py", *sys.argv[1:]]),
              "warmup": warmup, "steps": steps, "sizes": {}}
    out = Path(args.out or ("outputs/bench_gpt" if args.smoke else "benchmarks/results/pretrain"))
    path = out / f"gpt_throughput_{slug}.json"
    out.mkdir(parents=True, exist_ok=True)
    for size_name in sizes:
        size = {**SIZES, **SMOKE_SIZES}[size_name]
        config = config_of(size)
        row = {"config": size, "flops_per_token": gpt_flops_per_token(config, size["seq_len"]),
               "batch_tokens": size["batch"] * size["seq_len"]}
        result["sizes"][size_name] = row
        for variant in args.variants:   # the file is rewritten after every row: a cut run keeps what it measured
            row[variant] = measure(variant, size, device, warmup, steps)
            print(size_name, variant, json.dumps(row[variant]), flush=True)
            add_ratios(row)
            path.write_text(json.dumps(result, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
