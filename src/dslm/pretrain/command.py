"""Pretrain BERT (masked LM + segment-order head) or a GPT decoder (next-token LM) on a prepared dataset with the dslm training engine.

Defaults are the reference recipe of THEORY.md section 4 (BERT-base, L 512, global batch 256,
488,281 steps, lr 1e-4, 1% warmup, linear decay, bf16, Post-LN, megatron init). `--arch gpt` trains
a decoder on the same data and training recipe, GPT-2 small's shape unless flags say otherwise
(12 x 768, 12 heads, L 1024, tanh GeLU, Pre-LN, gpt2 init, LM head tied to the word embeddings):
each split's documents joined with [SEP] and cut into windows of L + 1 tokens. `--preset tiny` is a
CPU-sized run of either. Every value is a flag. Launch with torchrun for several GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from dslm.errors import UsageError
from dslm.files import write_text_atomic
from dslm.model import GPTConfig
from dslm.model.config import TransformerConfig
from dslm.model.flags import add_model_arguments, config_from_args
from dslm.pretrain.bert import PretrainTask
from dslm.pretrain.gpt import GPTPretrainTask
from dslm.runtime import is_main_process, require_package
from dslm.train.engine import (NonFiniteLoss, TrainConfig, add_train_arguments, exit_status, train,
                               train_config_from_args)

DEFAULT_DATA = "outputs/data/embedded"

# THEORY.md section 4
RECIPE = dict(layers=12, hidden=768, heads=12, ffn=None, seq_len=512, ln="post", activation="relu",
              init="megatron", dropout=0.1,
              out_dir="outputs/pretrain", steps=488_281, global_batch=256, lr=1e-4, warmup=0.01,
              weight_decay=0.01, clip=1.0, precision="bf16", eval_every=4000, eval_iters=50, save_every=50_000)
PRESETS = {
    "reference": {},
    "tiny": dict(layers=2, hidden=128, heads=2, seq_len=128, out_dir="outputs/pretrain_tiny", steps=300,
                 global_batch=32, lr=1e-3, warmup=0.05, precision="fp32", eval_every=100, eval_iters=5,
                 save_every=0, log_every=20, num_workers=1),
}
# the model each --arch trains unless a preset or a flag says otherwise (bert: RECIPE's BERT-base)
ARCH_MODELS = {
    "bert": {},
    "gpt": dict(layers=12, hidden=768, heads=12, ffn=None, seq_len=1024, ln="pre", activation="gelu_tanh",
                init="gpt2"),   # GPT-2 small
}
PRESET_KEYS = sorted(set(RECIPE) | {k for p in [*PRESETS.values(), *ARCH_MODELS.values()] for k in p})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags: architecture, preset, data, the model flags, --grad-profile and the
    engine's flags; those a preset or --arch sets stay out of the namespace unless given (resolved
    in :func:`run`)."""
    parser.add_argument("--arch", choices=sorted(ARCH_MODELS), default="bert",
                        help="bert: masked LM + segment-order head; gpt: a decoder trained on next-token "
                             "prediction (GPT-2 small's shape by default)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference",
                        help="defaults for every flag not given: the paper's recipe, or a CPU-sized run")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help=f"prepared dataset directory (default: the embedded corpus, prepared on first use in {DEFAULT_DATA})")
    m = parser.add_argument_group("model")
    add_model_arguments(m)
    m.add_argument("--seq-len", type=int, help="sequence length L")
    m.add_argument("--dropout", type=float, help="hidden and attention dropout")
    m.add_argument("--untie-embeddings", action="store_true",
                   help="--arch gpt: the LM head gets its own output matrix (default: the word-embedding table, "
                        "as in GPT-2)")
    parser.add_argument("--grad-profile", action="store_true",
                        help="--arch bert: probe the model at init and after training on 32 fixed valid sequences: per-layer "
                             "gradient norms, forward variance and correlation, written to final_metrics.json "
                             "(grad_profile)")
    add_train_arguments(parser, RECIPE)
    for action in parser._actions:
        if action.dest in PRESET_KEYS:
            action.help = f"{action.help or ''} ({_defaults_shown(action.dest, action.default)})"
            action.default = argparse.SUPPRESS


def _defaults_shown(key: str, fallback) -> str:
    """The defaults of a flag a preset or --arch sets, for its help: the recipe's, then --arch gpt's
    and each preset's where they differ from it."""
    default = RECIPE.get(key, fallback)
    shown = [f"default: {default}"]
    shown += [f"--arch {arch}: {m[key]}" for arch, m in ARCH_MODELS.items() if m.get(key, default) != default]
    shown += [f"{name}: {p[key]}" for name, p in PRESETS.items() if key in p]
    return "; ".join(shown)


def _resolve(args) -> argparse.Namespace:
    """Fill every flag not given from the preset, then the --arch model, the recipe and the engine's
    defaults."""
    base = {**TrainConfig().__dict__, **RECIPE, **ARCH_MODELS[args.arch], **PRESETS[args.preset]}
    for key in PRESET_KEYS + list(TrainConfig().__dict__):
        if not hasattr(args, key):
            setattr(args, key, base.get(key))
    return args


def run(args) -> int:
    """``dslm pretrain``: resolve and check the flags, prepare or open the dataset, train the --arch
    task and write ``final_metrics.json``. Exit status 0, 1 after too many non-finite steps in a
    row, 128 + the signal's number when a signal stopped the run."""
    require_package("safetensors", "train")   # checkpoints and the saved model
    args = _resolve(args)
    cfg = train_config_from_args(args)
    _check_flags(args)
    _model_config(args, vocab_size=30522)   # reject an impossible model before preparing any data
    data = _dataset_dir(args.data)
    from dslm.data.manifest import read_manifest

    config = _model_config(args, read_manifest(Path(data))["vocab_size"])
    task = _task(args, data, config, cfg)
    try:
        result = train(task, cfg)
    except NonFiniteLoss as e:
        print(f"dslm pretrain: {e}", flush=True)
        return 1
    if args.grad_profile and not result.get("stopped"):
        task.profiles["final"] = task.signal_profile(task.model)
        result["grad_profile"] = task.profiles
    if is_main_process():
        path = Path(cfg.out_dir) / "final_metrics.json"
        write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")
        print(f"final metrics: {path}")
    return exit_status(result)


def _check_flags(args) -> None:
    """One-line errors for flags without meaning here: a sequence shorter than 8, --untie-embeddings
    for BERT (its MLM decoder is the word-embedding table), --grad-profile for a decoder (the probe
    reads BERT) or under several ranks (it probes a whole model)."""
    if args.seq_len is None or args.seq_len < 8:
        raise UsageError(f"--seq-len {args.seq_len}: must be >= 8")
    if args.untie_embeddings and args.arch != "gpt":
        raise UsageError("--untie-embeddings: only with --arch gpt (BERT's MLM decoder is its word-embedding table)")
    if args.grad_profile and args.arch != "bert":
        raise UsageError(f"--grad-profile: the probe reads BERT models only, not --arch {args.arch}")
    if args.grad_profile and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--grad-profile: probes a whole model, so it runs in a single process only")


def _model_config(args, vocab_size: int) -> TransformerConfig:
    """The model config of the flags: BERT with max(512, L) positions, or a decoder with L positions
    and the LM head tied unless --untie-embeddings."""
    if args.arch == "gpt":
        return config_from_args(args, vocab_size, args.seq_len, GPTConfig, max_position_embeddings=args.seq_len,
                                tie_word_embeddings=not args.untie_embeddings)
    return config_from_args(args, vocab_size, args.seq_len)


def _task(args, data: str, config: TransformerConfig, cfg: TrainConfig):
    """The engine task of --arch on the dataset ``data``."""
    if args.arch == "gpt":
        return GPTPretrainTask(data, config, args.seq_len, seed=cfg.seed, num_workers=cfg.num_workers,
                               r0_auto=args.r0 == "auto")
    return PretrainTask(data, config, args.seq_len, seed=cfg.seed, num_workers=cfg.num_workers,
                        r0_auto=args.r0 == "auto", grad_profile=args.grad_profile)


def _dataset_dir(data: str | None) -> str:
    """``--data``, or the embedded corpus prepared on first use (by rank 0; the others wait for it)."""
    if data is not None:
        return data
    from dslm.data import ensure_embedded_dataset

    prepared = ensure_embedded_dataset(DEFAULT_DATA) if is_main_process() else None
    _barrier_files(DEFAULT_DATA)
    return str(prepared or DEFAULT_DATA)


def _barrier_files(data_dir: str) -> None:
    """Other ranks wait until rank 0 has prepared the embedded dataset (before any process group)."""
    if is_main_process():
        return
    deadline = time.time() + 600
    while not (Path(data_dir) / "dataset.json").is_file():
        if time.time() > deadline:
            raise UsageError(f"{data_dir}: timed out waiting for rank 0 to prepare the dataset")
        time.sleep(0.5)
