"""Pretraining throughput, kernel profiles and learning-curve runs of the dslm training engine.

    python benchmarks/bench_pretrain.py throughput --out DIR   # ours (eager, compiled) vs HF BertForPreTraining
    python benchmarks/bench_pretrain.py learning --out DIR     # small BERT + deep DSLM vs xavier/megatron runs
    python benchmarks/bench_pretrain.py plot --out DIR         # curves.png from the learning runs' metrics.jsonl
    python benchmarks/bench_pretrain.py learning --suite deep --parallel --time-limit S --out DIR
                                        # 96-layer Post-LN, dslm vs megatron vs xavier at two lrs, all at once
    python benchmarks/bench_pretrain.py plot --suite deep --out DIR
    python benchmarks/bench_pretrain.py learning --suite deep-long --parallel --gpus 1 2 3 --time-limit S --out DIR
                                        # the same with CUDA graphs, 4,000 planned steps, lr 1e-3 and 3e-3
    python benchmarks/bench_pretrain.py profile --sizes bert-base --variants ours-compiled --out DIR

Throughput: one optimizer step = forward + backward + global-norm clip (1.0) + fused AdamW, bf16
autocast with fp32 master weights, dropout 0.1, the same random batch (token ids uniform over the
vocabulary, 10 % of the sequences padded to a random shorter length, 15 % of the real tokens
predicted, a segment-order label) for both models. Timing: CUDA events around ``--steps`` steps after
``--warmup`` steps (which include compilation). Ours runs the engine's own step,
``Trainer.train_step`` (``BertForPreTraining`` with ``max_predictions``: LM head on the predicted
positions only, fixed slots, no host sync; the non-finite skip, the schedule and the device-side metric sums included).
HF runs ``BertForPreTraining``
(attn_implementation="sdpa", labels on every position as HF computes them).

MFU = tokens/s x F / 989e12 (H100 bf16 dense), with F = dslm.model.flops.bert_flops_per_token:
3 x [N (8 d^2 + 4 d d_f + 4 L d) + f (2 d^2 + 2 d V)], f = 0.15 (the useful LM-head work) for both
models; ``hf_mfu_full_head`` also counts the LM head HF computes on every position (f = 1).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dslm.model import BertConfig, BertForPreTraining
from dslm.train import distributed as D
from dslm.train.engine import TrainConfig, Trainer
from dslm.model.flops import bert_flops_per_token
from dslm.pretrain.bert import pretraining_loss_and_metrics

SIZES = {
    "bert-base": dict(num_layers=12, hidden_size=768, num_heads=12, seq_len=512, batch=32),
    "deep-narrow": dict(num_layers=96, hidden_size=256, num_heads=4, seq_len=256, batch=32),
}
PEAK = 989e12
# per-layer compile with mode="reduce-overhead" and compile + --cuda-graphs fail (docs/train.md);
# they are not offered
VARIANTS = ("hf", "ours", "ours-compiled", "ours-graphs", "ours-compiled-full", "ours-compiled-full-ro",
            "ours-compiled-full-ma")


def sdpa_backend(name):
    """A context forcing one SDPA backend (``default``: PyTorch's own choice)."""
    import contextlib

    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


def relu_mode(mode):
    """A context for our FFN / LM-head ReLU: ``fused`` (the model's own way: bias + ReLU in the
    GEMM's epilogue, :mod:`dslm.model.ops`) or ``unfused`` (GEMM, then a separate ReLU: the A/B)."""
    import contextlib
    from unittest import mock

    import torch.nn.functional as F

    from dslm.model import bert

    if mode == "fused":
        return contextlib.nullcontext()
    return mock.patch.object(bert, "_dense_activation", lambda linear, act, x: F.relu(linear(x)))


def make_batch(b, length, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    lengths = torch.full((b,), length)
    short = torch.rand(b, generator=g) < 0.1
    lengths[short] = torch.randint(length // 4, length, (int(short.sum()),), generator=g)
    pos = torch.arange(length)[None]
    mask = (pos < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.full((b, length), -100)
    for i in range(b):
        n = max(1, round(0.15 * int(lengths[i])))
        where = torch.randperm(int(lengths[i]) - 1, generator=g)[:n] + 1
        labels[i, where] = ids[i, where]
    tt = (pos >= lengths[:, None] // 2).long() * mask
    binary = torch.randint(0, 2, (b,), generator=g)
    batch = dict(input_ids=ids, token_type_ids=tt, attention_mask=mask, mlm_labels=labels, binary_labels=binary)
    return {k: v.to(device) for k, v in batch.items()}


def time_steps(step, warmup, steps, device="cuda"):
    """Seconds per call of ``step`` after ``warmup`` calls: CUDA events on a GPU, the wall clock
    (after the queue drained) on the CPU."""
    for _ in range(warmup):
        step()
    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t0) / steps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / steps


class BenchTask:
    """The pretraining objective on one fixed batch, compiled as a variant says: the task the engine's
    :class:`~dslm.train.engine.Trainer` runs for ``ours*`` (no data, no evaluation)."""

    name = "bench"

    def __init__(self, config, seq_len, variant):
        self.config, self.seq_len, self.variant = config, seq_len, variant

    def build_model(self):
        return BertForPreTraining(self.config)

    def train_dataset(self):
        return []

    def eval_datasets(self):
        return {}

    def loss_and_metrics(self, model, batch):
        return pretraining_loss_and_metrics(model, batch, round(0.15 * self.seq_len))

    def summarize(self, sums):
        return sums

    def compile_model(self, model):
        if self.variant.startswith("ours-compiled-full"):   # one graph for the whole forward (one for the backward)
            model.compile(mode={"ro": "reduce-overhead", "ma": "max-autotune"}.get(self.variant.rsplit("-", 1)[1]))
        else:                                               # ours-compiled: per layer, and the head + loss
            for layer in model.bert.layers:
                layer.compile()
            model.head_loss = torch.compile(model.head_loss)


def engine_step(task, batch, variant, device="cuda"):
    """The engine's step, :meth:`Trainer.train_step <dslm.train.engine.Trainer.train_step>` (forward,
    backward, clip 1.0, non-finite skip, fused AdamW, schedule) of ``task`` on the fixed ``batch``,
    bf16 autocast: eager, compiled (``ours-compiled*``: the task's ``compile_model``) or as CUDA
    graphs (``ours-graphs``: :class:`dslm.train.graphs.GraphedStep`, which also runs its first steps
    eagerly). Returns the model and a function running one step."""
    b = batch["input_ids"].shape[0]
    cfg = TrainConfig(out_dir=str(Path(tempfile.gettempdir()) / "bench_pretrain"), steps=10**9, global_batch=b,
                      micro_batch=b, lr=1e-4, warmup=0, weight_decay=0.01, clip=1.0, precision="bf16",
                      compile=variant.startswith("ours-compiled"), cuda_graphs="graphs" in variant,
                      device=device, progress=False)   # nothing is written unless a step is non-finite
    trainer = Trainer(task, cfg, D.setup(device))

    def step():
        if variant.endswith("-ro"):     # torch.compile's CUDA graphs: a new iteration begins
            torch.compiler.cudagraph_mark_step_begin()
        trainer.train_step([batch])
    return trainer.model, step


def ours_step(config, batch, variant):
    """:func:`engine_step` of BERT pretraining (:class:`BenchTask`), compiled per layer
    (``ours-compiled``) or as a whole (``ours-compiled-full``; ``-ro``: with torch.compile's own CUDA
    graphs, mode="reduce-overhead"; ``-ma``: mode="max-autotune", which also benchmarks Triton GEMM
    templates with fused epilogues against cuBLAS and uses CUDA graphs)."""
    return engine_step(BenchTask(config, batch["input_ids"].shape[1], variant), batch, variant)


def bench_ours(config, batch, variant, warmup, steps):
    model, step = ours_step(config, batch, variant)
    return time_steps(step, warmup, steps), loss_of(model, batch)


def loss_of(model, batch):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        return float(model(**batch)[0])


def bench_hf(config, batch, warmup, steps):
    from transformers import BertConfig as HFConfig
    from transformers import BertForPreTraining as HFBert

    hf_config = HFConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                         num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                         intermediate_size=config.ffn_size, hidden_act=config.activation,
                         max_position_embeddings=config.max_position_embeddings, layer_norm_eps=1e-5,
                         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="sdpa")
    model = HFBert(hf_config).cuda().train()
    assert model.config._attn_implementation == "sdpa"
    args = dict(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                attention_mask=batch["attention_mask"], labels=batch["mlm_labels"],
                next_sentence_label=batch["binary_labels"])
    return time_steps(hf_step(model, args), warmup, steps), None


def hf_step(model, args, device="cuda"):
    """One training step of an HF model as the benchmarks time it: forward under bf16 autocast (the
    model computes its loss from ``args``), backward, clip 1.0 (foreach), fused AdamW (lr 1e-4,
    weight decay 0.01), gradients set to None."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    params = list(model.parameters())
    device_type = torch.device(device).type

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(**args).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def throughput(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    # several invocations (e.g. one process per variant, so that one failure cannot poison the CUDA
    # state of the next) add their rows to the same file
    path = out / "throughput.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    results.setdefault("sizes", {})
    for name in args.sizes:
        s = SIZES[name]
        config = BertConfig(vocab_size=30522, hidden_size=s["hidden_size"], num_layers=s["num_layers"],
                            num_heads=s["num_heads"], max_position_embeddings=512, ln="post", activation="relu")
        batch = make_batch(s["batch"], s["seq_len"], config.vocab_size, "cuda")
        tokens = s["batch"] * s["seq_len"]
        flops = bert_flops_per_token(config, s["seq_len"], 0.15)
        flops_full = bert_flops_per_token(config, s["seq_len"], 1.0)
        row = results["sizes"].get(name) or {"config": s, "flops_per_token": flops, "batch_tokens": tokens}
        for variant in args.variants:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            key = variant if variant == "hf" else variant + args.label
            try:
                if variant == "hf":
                    sec, _ = bench_hf(config, batch, args.warmup, args.steps)
                else:
                    with sdpa_backend(args.sdpa), relu_mode(args.relu):
                        sec, _ = bench_ours(config, batch, variant, args.warmup, args.steps)
            except Exception as e:  # noqa: BLE001 - record and go on with the other variants
                row[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "device": results["device"]}
                print(name, key, "FAILED", row[key], flush=True)
            else:
                tps = tokens / sec
                row[key] = {"step_ms": sec * 1e3, "tokens_per_s": tps, "mfu": tps * flops / PEAK,
                            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                            "wall_s_incl_warmup": time.time() - t0, "sdpa": args.sdpa,
                            "device": results["device"]}
                if variant == "hf":
                    row[key]["hf_mfu_full_head"] = tps * flops_full / PEAK
                print(name, key, json.dumps(row[key]), flush=True)
            hf = row.get("hf", {})
            for v in row:   # ratios only against an HF row measured on the same kind of device
                if isinstance(row[v], dict) and "tokens_per_s" in row[v] and "tokens_per_s" in hf \
                        and row[v].get("device") == hf.get("device"):
                    row[v]["speedup_vs_hf"] = row[v]["tokens_per_s"] / hf["tokens_per_s"]
            results["sizes"][name] = row
            path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def profile(args):
    """Top GPU kernels of a few steps of our model (per size and variant), for finding the next
    bottleneck; tables go to OUT/profile_<size>_<variant>.txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.sizes:
        s = SIZES[name]
        config = BertConfig(vocab_size=30522, hidden_size=s["hidden_size"], num_layers=s["num_layers"],
                            num_heads=s["num_heads"], max_position_embeddings=512, ln="post", activation="relu")
        batch = make_batch(s["batch"], s["seq_len"], config.vocab_size, "cuda")
        for variant in [v for v in args.variants if v != "hf"]:
            with sdpa_backend(args.sdpa), relu_mode(args.relu):
                _, step = ours_step(config, batch, variant)
                for _ in range(args.warmup):
                    step()
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                   record_shapes=args.record_shapes) as prof:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
            table = prof.key_averages(group_by_input_shape=args.record_shapes).table(
                sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=110)
            (out / f"profile_{name}_{variant}{args.label}.txt").write_text(table + "\n")
            print(f"== {name} {variant}\n{table}", flush=True)
    return 0


LEARNING_RUNS = {
    # name: (model flags, train flags)
    "small_bert": dict(layers=4, hidden=256, heads=4, seq_len=128, init="megatron", ln="post",
                       steps=800, global_batch=64, lr=5e-4, warmup=0.05),
    "deep96_dslm": dict(layers=96, hidden=256, heads=4, seq_len=128, init="dslm", ln="post",
                        steps=300, global_batch=32, lr=1e-3, warmup=0.05),
    "deep96_megatron": dict(layers=96, hidden=256, heads=4, seq_len=128, init="megatron", ln="post",
                            steps=300, global_batch=32, lr=1e-3, warmup=0.05),
    "deep96_xavier": dict(layers=96, hidden=256, heads=4, seq_len=128, init="xavier", ln="post",
                          steps=300, global_batch=32, lr=1e-3, warmup=0.05),
}


# The deep comparison: 96-layer Post-LN, d 256, the same lr, warmup and data order for every init
# scheme. Every run is its own process so that `--parallel` can share GPUs (`--gpus` spreads them).
# "deep": eager engine, 600 steps; "deep-long": CUDA graphs (several times the steps per second) and a
# 4,000-step schedule.
DEEP_INITS = ("dslm", "megatron", "xavier")


def deep_suite(lrs, steps, tag="", **overrides):
    suite = {}
    for lr in lrs:
        for init in DEEP_INITS:
            run = dict(layers=96, hidden=256, heads=4, seq_len=128, init=init, ln="post", steps=steps,
                       global_batch=64, lr=float(lr), warmup=0.02)
            run.update(overrides)
            suite[f"deep96{tag}_{init}_lr{lr}"] = run
    return suite


LEARNING_DEEP = deep_suite(("2e-3", "5e-3"), 600)
LEARNING_DEEP_LONG = deep_suite(("1e-3", "3e-3"), 4000, cuda_graphs=True)
# the stress test: no warmup and no clipping, where Post-LN baselines are known to blow up
LEARNING_DEEP_STRESS = deep_suite(("1e-3", "3e-3", "1e-2"), 600, tag="stress", cuda_graphs=True, warmup=0, clip=0)
# the paper's width (d 1024), where megatron's std 0.02 lets every block dominate the stream
# (~1.2B parameters per run: one run per GPU)
LEARNING_DEEP_WIDE = deep_suite(("5e-4", "1e-3"), 1500, tag="wide", hidden=1024, heads=16, cuda_graphs=True)
# BERT's own lr (1e-4) and 3e-4, 2,000 steps. Two 12-layer runs at 3e-4 show what this step budget
# buys a model that is not deep (controls, same width and data).
LEARNING_DEEP_LOWLR = {**deep_suite(("1e-4", "3e-4"), 2000, tag="low", cuda_graphs=True),
                       **{f"deep12ctl_{init}_lr3e-4": dict(layers=12, hidden=256, heads=4, seq_len=128, init=init,
                                                          ln="post", steps=2000, global_batch=64, lr=3e-4,
                                                          warmup=0.02, cuda_graphs=True)
                          for init in ("dslm", "megatron")}}
# lr 1e-4 with another seed (weights, data order, masks), and DSLM also at 2e-4
LEARNING_DEEP_SEED2 = {name: run for name, run in deep_suite(("1e-4", "2e-4"), 2000, tag="s2", cuda_graphs=True,
                                                             seed=2).items()
                       if name.endswith("lr1e-4") or "_dslm_" in name}
SUITES = {"basic": LEARNING_RUNS, "deep": LEARNING_DEEP, "deep-long": LEARNING_DEEP_LONG,
          "deep-stress": LEARNING_DEEP_STRESS, "deep-wide": LEARNING_DEEP_WIDE, "deep-lowlr": LEARNING_DEEP_LOWLR,
          "deep-seed2": LEARNING_DEEP_SEED2}


def learning_argv(name, r, out, args):
    eval_every = r["steps"] // (6 if args.suite.startswith("deep") else 4)
    argv = ["pretrain", "--out-dir", str(out / name), "--eval-every", str(eval_every), "--eval-iters", "10",
            "--save-every", "0", "--no-save-final", "--log-every", "10", "--no-progress", "--max-bad-steps", "1000000",
            "--precision", args.precision, "--device", args.device]
    if args.num_workers is not None:
        argv += ["--num-workers", str(args.num_workers)]
    for k, v in r.items():
        flag = f"--{k.replace('_', '-')}"
        argv += ([flag] if v else []) if isinstance(v, bool) else [flag, str(v)]
    if args.quick:   # a CPU smoke run: no CUDA graphs
        argv = [a for a in argv if a != "--cuda-graphs"]
        argv += ["--steps", "6", "--eval-every", "3", "--eval-iters", "1", "--layers", "2", "--hidden", "64",
                 "--heads", "2", "--seq-len", "64", "--global-batch", "4"]
    return argv


def learning(args):
    from dslm.cli import main as cli_main

    out = Path(args.out)
    runs = SUITES[args.suite]
    names = args.runs or list(runs)
    unknown = [n for n in names if n not in runs]
    if unknown:
        raise SystemExit(f"--runs {unknown[0]}: not in --suite {args.suite} (its runs: {', '.join(runs)})")
    if not args.parallel:
        for name in names:
            t0 = time.time()
            rc = cli_main(learning_argv(name, runs[name], out, args))
            print(f"{name}: rc {rc}, {time.time() - t0:.1f} s", flush=True)
        return 0
    # One process per run, all started at once; after --time-limit seconds the ones still running
    # are killed (their metrics.jsonl keeps every line logged so far; the lr schedule stays the
    # planned one, so a cut run is the first part of the full run).
    import os
    import signal
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    t0 = time.time()
    for i, name in enumerate(names):
        (out / name).mkdir(parents=True, exist_ok=True)
        log = (out / name / "stdout.log").open("w")
        cmd = [sys.executable, "-m", "dslm", *learning_argv(name, runs[name], out, args)]
        env = dict(os.environ)
        if args.gpus:
            env["CUDA_VISIBLE_DEVICES"] = args.gpus[i % len(args.gpus)]
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    status = {}
    while procs:
        time.sleep(1.0)
        for name, p in list(procs.items()):
            if p.poll() is not None:
                status[name] = {"rc": p.returncode, "wall_s": round(time.time() - t0, 1), "cut": False}
                print(f"{name}: rc {p.returncode}, {time.time() - t0:.1f} s", flush=True)
                del procs[name]
        if args.time_limit and time.time() - t0 > args.time_limit:
            for name, p in procs.items():
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                status[name] = {"rc": None, "wall_s": round(time.time() - t0, 1), "cut": True}
                print(f"{name}: cut at the time limit ({args.time_limit} s)", flush=True)
            procs = {}
    (out / "runs_status.json").write_text(json.dumps(status, indent=2) + "\n")
    return 0


def plot(args):
    if args.suite.startswith("deep"):
        return plot_deep(args)
    from dslm.plotting import plt, save
    from dslm.train.logging import read_metrics

    out = Path(args.out)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in LEARNING_RUNS:
        if not (out / name / "metrics.jsonl").is_file():
            continue
        rows = read_metrics(out / name, "train")
        valid = read_metrics(out / name, "valid")
        ax = axes[0] if name == "small_bert" else axes[2]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r.get("mlm_loss", float("nan")) for r in rows], label=f"{name} train")
        if valid:
            ax.plot([r["step"] for r in valid], [r["mlm_loss"] for r in valid], "o--", label=f"{name} valid")
        if name == "small_bert":
            axes[1].plot(steps, [r.get("mlm_acc", float("nan")) for r in rows], label="train")
            if valid:
                axes[1].plot([r["step"] for r in valid], [r["mlm_acc"] for r in valid], "o--", label="valid")
    axes[0].set(title="small BERT (4 x 256), embedded corpus", xlabel="step", ylabel="MLM loss")
    axes[1].set(title="small BERT: MLM accuracy (chance 1/8192)", xlabel="step", ylabel="accuracy")
    axes[2].set(title="96-layer Post-LN, d 256, same lr", xlabel="step", ylabel="MLM loss")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    print(save(fig, out / "curves.png"))
    return 0


def unigram_plateau(data_dir="outputs/data/embedded"):
    """(entropy in nats, accuracy of always predicting the most frequent token) of the corpus's
    unigram distribution (ids > 4, i.e. without the special tokens): the MLM loss and accuracy of a
    model that ignores the context. None when the dataset is not there."""
    import numpy as np

    path = Path(data_dir) / "tokens.bin"
    if not path.is_file():
        return None
    tokens = np.fromfile(path, dtype=np.uint16)
    counts = np.bincount(tokens[tokens > 4]).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()), float(p.max())


def plot_deep(args):
    from dslm.plotting import plt, save
    from dslm.train.logging import read_metrics

    out = Path(args.out)
    plateau = unigram_plateau(args.data)
    suite = SUITES[args.suite]
    controls = {name: r for name, r in suite.items() if "ctl_" in name}
    lrs = sorted({name.split("_lr")[1] for name in suite if name not in controls}, key=float)
    fig, axes = plt.subplots(2, len(lrs), figsize=(6.5 * len(lrs), 8), squeeze=False)
    colors = {"dslm": "tab:blue", "megatron": "tab:orange", "xavier": "tab:green"}
    for j, lr in enumerate(lrs):
        for init in DEEP_INITS:
            name = next((n for n in suite if n.endswith(f"_{init}_lr{lr}") and n not in controls), None)
            if name is None or not (out / name / "metrics.jsonl").is_file():
                continue
            rows = read_metrics(out / name, "train")
            valid = read_metrics(out / name, "valid")
            steps = [r["step"] for r in rows]
            for i, key in enumerate(("mlm_loss", "mlm_acc")):
                axes[i][j].plot(steps, [r.get(key, float("nan")) for r in rows], color=colors[init],
                                label=f"{init} train")
                if valid:
                    axes[i][j].plot([r["step"] for r in valid], [r[key] for r in valid], "o--",
                                    color=colors[init], label=f"{init} valid")
        for name, r in controls.items():     # shallow controls: dotted, in the panels of their lr
            if float(r["lr"]) != float(lr) or not (out / name / "metrics.jsonl").is_file():
                continue
            rows = read_metrics(out / name, "train")
            init = name.split("ctl_")[1].split("_lr")[0]
            for i, key in enumerate(("mlm_loss", "mlm_acc")):
                axes[i][j].plot([r_["step"] for r_ in rows], [r_.get(key, float("nan")) for r_ in rows], ":",
                                color=colors[init], label=f"{init}, {r['layers']} layers (control)")
        axes[0][j].set(title=f"96-layer Post-LN, d 256, lr {lr}: MLM loss", xlabel="step", ylabel="MLM loss")
        axes[1][j].set(title=f"lr {lr}: MLM accuracy", xlabel="step", ylabel="accuracy")
        if plateau:
            axes[0][j].axhline(plateau[0], color="gray", ls=":", label=f"unigram entropy {plateau[0]:.2f}")
            axes[1][j].axhline(plateau[1], color="gray", ls=":", label=f"most frequent token {plateau[1]:.3f}")
    for ax in axes.flat:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    print(save(fig, out / "curves.png"))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("throughput", "profile", "learning", "plot"))
    p.add_argument("--out", default="outputs/bench_pretrain")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--variants", nargs="+", default=["hf", "ours", "ours-compiled", "ours-graphs"],
                   choices=list(VARIANTS))
    p.add_argument("--sdpa", choices=("default", "cudnn", "flash", "efficient"), default="default",
                   help="throughput: force an SDPA backend for our model (HF keeps its default)")
    p.add_argument("--relu", choices=("fused", "unfused"), default="fused",
                   help="throughput/profile A/B of our ReLU layers: fused (the model's bias+ReLU GEMM "
                        "epilogue) or unfused (GEMM, then a separate ReLU pass)")
    p.add_argument("--label", default="",
                   help="throughput/profile: suffix for our rows / profile files (e.g. '+unfused')")
    p.add_argument("--rows", type=int, default=30, help="profile: kernels listed per table")
    p.add_argument("--record-shapes", action="store_true",
                   help="profile: one row per operator and input shapes (which call launched a kernel)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--suite", choices=list(SUITES), default="basic",
                   help="learning/plot: the small-BERT + first deep runs, or a deep96 lr comparison")
    p.add_argument("--runs", nargs="+", default=None, choices=sorted({n for suite in SUITES.values() for n in suite}),
                   help="learning: a subset of the suite's runs (default: all)")
    p.add_argument("--parallel", action="store_true", help="learning: start every run at once, one process each")
    p.add_argument("--time-limit", type=float, default=None,
                   help="learning --parallel: kill the runs still going after this many seconds")
    p.add_argument("--num-workers", type=int, default=None, help="learning: data-loader processes per run")
    p.add_argument("--gpus", nargs="+", default=None,
                   help="learning --parallel: CUDA device ids to spread the runs over (round robin)")
    p.add_argument("--data", default="outputs/data/embedded", help="plot --suite deep: dataset for the unigram line")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="learning: a seconds-long CPU smoke run")
    args = p.parse_args(argv)
    return {"throughput": throughput, "profile": profile, "learning": learning, "plot": plot}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
