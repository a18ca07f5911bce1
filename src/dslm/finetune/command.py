"""Finetune a pretrained BERT on MNLI, QQP or RACE (or the shipped demo task) with the dslm training engine.

Defaults per task are THEORY.md section 4's recipe: L 512, weight decay 0.01, linear decay, clip
1.0, bf16, dropout 0.1; MNLI 3 epochs, batch 32, warmup 0.1; QQP 5 epochs, batch 32, warmup 0.1;
RACE 5 epochs, batch 8 questions x 4 options, warmup 0.06. Evaluation once per epoch and at the
end on the full dev sets; predictions_<split>.tsv and final_metrics.json in --out-dir. Launch with
torchrun for several GPUs; `dslm finetune-sweep` runs the lr x seed grid.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from dslm.files import write_text_atomic
from dslm.errors import UsageError
from dslm.model.flags import add_model_arguments, config_from_args
from dslm.runtime import is_main_process, require_package, resolve_device

COMMON = dict(lr=2e-5, weight_decay=0.01, clip=1.0, precision="bf16", eval_iters=None, save_every=0,
              keep_last=1, log_every=50, num_workers=1, max_len=512, dropout=0.1)
RECIPES = {
    "mnli": dict(epochs=3.0, global_batch=32, warmup=0.1, out_dir="outputs/finetune/mnli"),
    "qqp": dict(epochs=5.0, global_batch=32, warmup=0.1, out_dir="outputs/finetune/qqp"),
    "race": dict(epochs=5.0, global_batch=8, warmup=0.06, out_dir="outputs/finetune/race"),
    # CPU-sized: a fresh tiny model learns the shipped pairs in well under a minute
    "demo": dict(epochs=12.0, global_batch=16, warmup=0.1, lr=1e-3, precision="fp32", max_len=64,
                 log_every=25, num_workers=0, dropout=0.0, out_dir="outputs/finetune/demo"),
}
# flags whose default depends on --task (absent from the namespace unless given; resolved in run())
TASK_KEYS = sorted(set(COMMON) | {k for r in RECIPES.values() for k in r} | {"eval_every"})
FRESH = dict(layers=2, hidden=64, heads=2, ffn=None, ln="post", activation="relu", init="dslm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dslm.train.engine import add_train_arguments

    parser.add_argument("--task", required=True, choices=("mnli", "qqp", "race", "demo"),
                        help="the finetuning task")
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="GLUE's MNLI or QQP folder (train.tsv, dev*.tsv), RACE's folder (train|dev|test/"
                             "{middle,high}/*.txt), or 'hf' for the HF hub (nyu-mll/glue, ehovy/race); "
                             "the demo task reads its shipped files")
    parser.add_argument("--race-level", choices=("all", "middle", "high"), default="all",
                        help="RACE: train and evaluate on both levels or one")
    parser.add_argument("--init-from", metavar="CKPT", default=None,
                        help="pretrained encoder: a dslm model/checkpoint directory, a pretraining run folder "
                             "(its newest checkpoint) or a local HF BERT folder; without it a fresh model "
                             "(the model flags below) is trained from scratch")
    parser.add_argument("--vocab", metavar="PATH", default=None,
                        help="BERT vocab.txt, or a folder with one (a prepared dataset, an HF model); default: "
                             "the vocab.txt next to --init-from, else (demo, fresh model) the embedded vocabulary")
    parser.add_argument("--max-len", type=int, help="sequence length L (tokens, [CLS]/[SEP] included)")
    parser.add_argument("--qa-max-len", type=int, default=128, help="RACE: tokens kept of question + option")
    parser.add_argument("--dropout", type=float, help="hidden and attention dropout of the finetuned model")
    parser.add_argument("--pad-to-max", action="store_true",
                        help="pad every batch to --max-len (default: to the batch's longest, a multiple of 8)")
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="token cache (default: .dslm_cache in the data folder if writable, else "
                             "outputs/finetune_cache)")
    parser.add_argument("--max-train", type=int, default=None, metavar="N",
                        help="use a fixed random subset of N training examples (smoke runs)")
    parser.add_argument("--max-eval", type=int, default=None, metavar="N",
                        help="use a fixed random subset of N examples of each evaluation split")
    m = parser.add_argument_group("fresh model (only without --init-from)")
    add_model_arguments(m, FRESH)
    # no --cuda-graphs: finetuning batches are padded to their longest example, so shapes vary
    add_train_arguments(parser, COMMON, exclude=("cuda_graphs",))
    for action in parser._actions:
        if action.dest in TASK_KEYS:
            shown = {t: r.get(action.dest, COMMON.get(action.dest, action.default)) for t, r in RECIPES.items()}
            if action.dest == "eval_every":
                shown = {t: "once per epoch" for t in RECIPES}
            text = "; ".join(f"{t}: {v}" for t, v in shown.items())
            action.help = f"{action.help or ''} (default {text})"
            action.default = argparse.SUPPRESS


def resolve_defaults(args) -> argparse.Namespace:
    """Fill the task-dependent flags the user did not give from the task's recipe."""
    from dslm.train.engine import TrainConfig

    base = {**TrainConfig().__dict__, **COMMON, **RECIPES[args.task]}
    for key in TASK_KEYS:
        if not hasattr(args, key):
            setattr(args, key, base.get(key) if key != "eval_every" else None)
    return args


def _log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


def _embedded_vocab() -> Path:
    import dslm.data

    return Path(dslm.data.__file__).resolve().parent / "embedded_vocab.txt"


def resolve_vocab(args, checkpoint_dir: Path | None) -> Path:
    """The vocab.txt to tokenise with (see --vocab)."""
    if args.vocab:
        p = Path(args.vocab)
        if p.is_dir():
            p = p / "vocab.txt"
        if not p.is_file():
            raise UsageError(f"--vocab {args.vocab}: no such vocabulary file (expected a vocab.txt or a folder with one)")
        return p
    if checkpoint_dir is not None:
        for d in [checkpoint_dir, *list(checkpoint_dir.parents)[:3]]:
            if (d / "vocab.txt").is_file():
                return d / "vocab.txt"
        raise UsageError(f"--init-from {args.init_from}: no vocab.txt next to the checkpoint; give --vocab (the "
                         f"pretraining dataset folder or its vocab.txt)")
    return _embedded_vocab()


def _subset(enc, n: int | None, seed: int = 0):
    """A fixed random subset of ``n`` examples (order kept)."""
    from dslm.finetune.features import Encoded

    if n is None or n >= len(enc):
        return enc
    if n < 1:
        raise UsageError(f"--max-train/--max-eval {n}: must be >= 1")
    keep = np.sort(np.random.default_rng(seed).choice(len(enc), n, replace=False))
    c = enc.choices
    seqs = (keep[:, None] * c + np.arange(c)[None, :]).reshape(-1)
    lengths = np.diff(enc.offsets)[seqs]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([enc.ids[enc.offsets[s]:enc.offsets[s + 1]] for s in seqs]) if len(seqs) else enc.ids[:0]
    return Encoded(ids, offsets, enc.seg0[seqs], enc.labels[keep], enc.guids[keep], enc.levels[keep], c)


def _load_all(args, spec, tokenizer, data: str):
    from dslm.finetune.features import EncodedDataset
    from dslm.finetune.readers import RACE_LEVELS, ReadReport
    from dslm.finetune.tasks import default_cache_dir, load_split

    levels = RACE_LEVELS if args.race_level == "all" else (args.race_level,)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir(data)
    sets, reports = {}, {}
    for split in (spec.train_split, *spec.eval_splits):
        t0 = time.perf_counter()
        enc, meta = load_split(spec, data, split, tokenizer, args.max_len, args.qa_max_len, cache, levels, log=_log)
        report = ReadReport.from_dict(meta["report"])
        took = time.perf_counter() - t0
        how = f"tokenised in {meta.get('tokenise_seconds', took):.1f} s" if meta.get("fresh") else \
            f"loaded in {took:.1f} s"
        _log(f"{split}: {report.summary()} [{how}]")
        limit = args.max_train if split == spec.train_split else args.max_eval
        enc = _subset(enc, limit)
        sets[split] = EncodedDataset(enc, tokenizer.special.pad, args.max_len, args.pad_to_max)
        reports[split] = {**report.to_dict(), "used": len(enc)}
    return sets, reports


def run(args) -> int:
    from dslm.finetune.tasks import SPECS, FinetuneTask
    from dslm.train.engine import NonFiniteLoss, exit_status, train, train_config_from_args

    require_package("safetensors", "train")   # checkpoints and the saved model
    args = resolve_defaults(args)
    spec = SPECS[args.task]
    data = _check_args(args)
    config, tokenizer, factory, source = _encoder(args)
    _log(f"finetune {spec.name}: {source}; data {data}")

    sets, reports = _load_all(args, spec, tokenizer, data)
    train_set = sets.pop(spec.train_split)
    if args.eval_every is None:  # once per epoch
        args.eval_every = max(1, math.ceil(len(train_set) / args.global_batch))
    cfg = train_config_from_args(args)
    if cfg.fsdp and not cfg.save_final:
        raise UsageError("--fsdp with --no-save-final: the predictions are made from the final checkpoint "
                         "(the sharded model is gone when training ends); drop --no-save-final")
    task = FinetuneTask(spec, config, factory, train_set, sets, args.max_len)
    try:
        result = train(task, cfg)
    except NonFiniteLoss as e:
        print(f"dslm finetune: {e}", flush=True)
        return 1
    if is_main_process():
        info = {"max_len": args.max_len, "init_from": source, "data": data, "data_reports": reports}
        _write_results(task, cfg, spec, sets, result, info)
    return exit_status(result)


def _check_args(args) -> str:
    """Refuse impossible flag values; returns the data location (the shipped files for the demo)."""
    from dslm.finetune.tasks import DEMO_DATA

    if args.max_len is None or args.max_len < 8:
        raise UsageError(f"--max-len {args.max_len}: must be >= 8")
    if args.qa_max_len < 1:
        raise UsageError(f"--qa-max-len {args.qa_max_len}: must be >= 1")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout {args.dropout}: must be in [0, 1)")
    if args.data is not None:
        return args.data
    if args.task != "demo":
        raise UsageError(f"--data is required for --task {args.task} (the GLUE/RACE folder, or 'hf')")
    return str(DEMO_DATA)


def _encoder(args):
    """(config, tokenizer, model factory, description) of the encoder to finetune: loaded once from
    --init-from, or a fresh model of the model flags (the engine calls the factory after seeding)."""
    from dslm.data.vocab import Tokenizer
    from dslm.finetune.heads import load_encoder, resolve_checkpoint
    from dslm.model import BertModel

    if args.init_from:
        ckpt = resolve_checkpoint(args.init_from)
        encoder, source = load_encoder(ckpt, args.dropout)
        config = encoder.config
        tokenizer = Tokenizer.from_file(resolve_vocab(args, ckpt))
        factory = lambda: encoder  # noqa: E731
    else:
        tokenizer = Tokenizer.from_file(resolve_vocab(args, None))
        if args.r0 == "auto":
            raise UsageError("--r0 auto: measured by dslm pretrain only; give a number for a fresh finetuned model")
        config = config_from_args(args, tokenizer.vocab_size, args.max_len)
        source = f"fresh {args.layers}-layer d={args.hidden} model ({args.init} init)"
        factory = lambda: BertModel(config)  # noqa: E731
    if tokenizer.vocab_size > config.vocab_size:
        raise UsageError(f"--vocab: {tokenizer.vocab_size} tokens but the model has {config.vocab_size} "
                         f"embeddings (the vocabulary of another model?)")
    if tokenizer.vocab_size < config.vocab_size:
        _log(f"note: vocabulary has {tokenizer.vocab_size} tokens, the model {config.vocab_size} embeddings")
    if args.max_len > config.max_position_embeddings:
        raise UsageError(f"--max-len {args.max_len} exceeds the model's {config.max_position_embeddings} positions")
    return config, tokenizer, factory, source


def _write_results(task, cfg, spec, sets: dict, result: dict, info: dict) -> None:
    """The predictions of each eval split (a finished run only) and final_metrics.json; prints the
    eval metrics."""
    from dslm.finetune.tasks import predict, write_predictions

    out = Path(cfg.out_dir)
    predictions = {}
    if not result.get("stopped"):
        model = _final_model(task, result)
        for split, dataset in sets.items():
            logits = predict(model, dataset, cfg.eval_batch or cfg.micro_batch or cfg.global_batch, cfg.precision)
            path = out / f"predictions_{split}.tsv"
            predictions[split] = {"file": path.name, **write_predictions(path, spec, dataset, logits)}
    final = {"task": spec.name, "lr": cfg.lr, "seed": cfg.seed, "epochs": cfg.epochs, "global_batch": cfg.global_batch,
             "max_len": info["max_len"], "init_from": info["init_from"], "data": info["data"],
             "eval": result.get("eval", {}), "train": result.get("train", {}), "steps": result.get("steps"),
             "tokens_per_s": result.get("tokens_per_s"), "stopped": result.get("stopped"),
             "checkpoint": result.get("checkpoint"), "predictions": predictions, "data_reports": info["data_reports"]}
    path = out / "final_metrics.json"
    write_text_atomic(path, json.dumps(final, indent=2, default=str) + "\n")
    for split, m in final["eval"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and k != "loss")
        print(f"{split}: {shown}")
    print(f"final metrics: {path}", flush=True)


def _final_model(task, result):
    """The trained model for predictions: the task's own module, or (FSDP, sharded over the ranks)
    a fresh copy with the final checkpoint's weights on this process's device."""
    model = task.model
    if not getattr(model, "dslm_fsdp", False):
        return model
    from safetensors.torch import load_file

    from dslm.finetune.heads import MultipleChoice, SequenceClassifier
    from dslm.model import BertModel

    encoder = BertModel(task.config, init=False)
    if task.spec.kind == "race":
        fresh = MultipleChoice(task.config, task.spec.num_labels, encoder=encoder)
    else:
        fresh = SequenceClassifier(task.config, task.spec.num_labels, encoder=encoder)
    fresh.load_state_dict(load_file(str(Path(result["checkpoint"]) / "model.safetensors")))
    device = resolve_device("auto")
    return fresh.to(device)
