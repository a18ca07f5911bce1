"""Pretrain BERT (masked LM + segment-order head) on a prepared dataset with the dslm training engine.

Defaults are the reference recipe of THEORY.md section 4 (BERT-base, L 512, global batch 256,
488,281 steps, lr 1e-4, 1% warmup, linear decay, bf16, Post-LN, megatron init); `--preset tiny`
is a CPU-sized run. Every value is a flag. Launch with torchrun for several GPUs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from dslm.files import write_text_atomic
from dslm.errors import UsageError
from dslm.model import BertConfig, BertForPreTraining
from dslm.model.flags import add_model_arguments, config_from_args
from dslm.runtime import is_main_process, require_package, resolve_device
from dslm.train.engine import NonFiniteLoss, add_train_arguments, exit_status, train, train_config_from_args

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
PRESET_KEYS = sorted(set(RECIPE) | {k for p in PRESETS.values() for k in p})


def bert_flops_per_token(config: BertConfig, seq_len: int, lm_fraction: float = 0.15) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward; a multiply-add = 2 FLOPs):

        3 x [ N (8 d^2 + 4 d d_f + 4 L d) + f (2 d^2 + 2 d V) ]

    per layer: QKV + output projections 8 d^2, FFN 4 d d_f, attention scores and values 4 L d; the LM
    head (dense d x d and the tied d x V decoder) runs on the fraction ``f`` of positions that are
    predicted (0.15 here; 1.0 for a head on every position, as in HF). Embeddings, LayerNorms,
    softmax, pooler and binary head are left out. For d_f = 4 d this is 6 x (12 N d^2) + 12 N L d per
    token (+ the head), the usual "6 x parameters + attention" estimate."""
    d, n, df, v = config.hidden_size, config.num_layers, config.ffn_size, config.vocab_size
    return 3.0 * (n * (8 * d * d + 4 * d * df + 4 * seq_len * d) + lm_fraction * (2 * d * d + 2 * d * v))


def pretraining_loss_and_metrics(model, batch: dict, max_predictions: int):
    """The training loss of a :class:`BertForPreTraining` (MLM + binary head, static prediction
    slots: no host sync) and the metric sums the engine accumulates."""
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["mlm_labels"],
                batch["binary_labels"], max_predictions=max_predictions)
    return out.loss, {"mlm_loss_sum": out.mlm_loss_sum, "mlm_count": out.mlm_count, "mlm_correct": out.mlm_correct,
                      "binary_loss_sum": out.binary_loss_sum, "binary_count": out.binary_count,
                      "binary_correct": out.binary_correct}


def summarize_pretraining(sums: dict) -> dict:
    out = {}
    if sums.get("mlm_count"):
        out["mlm_loss"] = sums["mlm_loss_sum"] / sums["mlm_count"]
        out["mlm_acc"] = sums["mlm_correct"] / sums["mlm_count"]
        out["ppl"] = math.exp(min(out["mlm_loss"], 700.0))
    if sums.get("binary_count"):
        out["binary_loss"] = sums["binary_loss_sum"] / sums["binary_count"]
        out["binary_acc"] = sums["binary_correct"] / sums["binary_count"]
    if "mlm_loss" in out and "binary_loss" in out:
        out["loss"] = out["mlm_loss"] + out["binary_loss"]
    return out


class PretrainTask:
    """BERT pretraining on a prepared dataset directory (``dslm prepare-data``): train / valid / test
    splits of :class:`dslm.data.PretrainingDataset`, batches from :func:`dslm.data.make_loader`."""

    name = "pretrain"

    def __init__(self, data_dir, config: BertConfig, seq_len: int, seed: int = 1234, num_workers: int = 2,
                 r0_auto: bool = False, pin_memory: bool | None = None, grad_profile: bool = False):
        self.data_dir, self.config, self.seq_len, self.seed = Path(data_dir), config, seq_len, seed
        self.num_workers, self.r0_auto, self.grad_profile = num_workers, r0_auto, grad_profile
        self.model: BertForPreTraining | None = None   # the model build_model made (trained in place)
        self.profiles: dict[str, dict] = {}
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.tokens_per_item = seq_len
        self._datasets = {}
        if seq_len > config.max_position_embeddings:
            raise UsageError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                             f"{config.max_position_embeddings}")

    def dataset(self, split: str):
        from dslm.data import PretrainingDataset

        if split not in self._datasets:
            self._datasets[split] = PretrainingDataset(self.data_dir, split, self.seq_len, self.seed)
        return self._datasets[split]

    @property
    def max_predictions(self) -> int:
        return self.dataset("train").config.max_predictions

    def build_model(self) -> nn.Module:
        if self.r0_auto and self.config.uses_dslm_init:
            from dslm.probe import measure_r0

            probe = BertForPreTraining(self.config)
            batch = self.dataset("train").get_batch(range(min(64, len(self.dataset("train")))))
            r0 = measure_r0(probe, batch)
            self.config = BertConfig.from_dict({**self.config.to_dict(), "r0": r0})
            print(f"measured r0 = {r0:.4f}", flush=True)
        model = BertForPreTraining(self.config)
        if self.grad_profile and is_main_process():
            self.profiles["init"] = self.signal_profile(model)
        self.model = model
        return model

    def signal_profile(self, model: BertForPreTraining, sequences: int = 32) -> dict:
        """Per-layer gradient norms (each weight matrix and all six together), forward variance and
        correlation of ``model`` on the first ``sequences`` of the fixed valid set, in training mode
        (:func:`dslm.probe.probe_model`), on the GPU when there is one. The RNG states are restored
        afterwards, so a profile taken before training leaves the run's dropout masks unchanged."""
        from dslm.data.evalset import FrozenEvalSet
        from dslm.probe import probe_model

        valid = FrozenEvalSet(self.data_dir, "valid", self.seq_len)
        batch = valid.get_batch(range(min(sequences, len(valid))))
        home = next(model.parameters()).device
        device = resolve_device("auto") if home.type == "cpu" else home
        model.to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            result = probe_model(model, batch, micro_batch_size=8)
        model.to(home)
        return {"grad_norm": result.grad_norm.tolist(),
                "grad_norms": {k: v.tolist() for k, v in result.grad_norms.items()},
                "forward_variance": result.forward_variance.tolist(),
                "correlation": result.correlation.tolist(), "loss": result.loss}

    def config_dict(self) -> dict:
        return {**self.config.to_dict(), "seq_len": self.seq_len}

    def parameter_count(self) -> int:
        """Parameters of the model this task builds, counted on the meta device (nothing allocated)."""
        with torch.device("meta"):
            return sum(p.numel() for p in BertForPreTraining(self.config, init=False).parameters())

    def run_files(self) -> dict:
        """The run folder carries its vocabulary, so that `dslm finetune --init-from` finds it."""
        return {"vocab.txt": self.data_dir / "vocab.txt"}

    def train_dataset(self):
        return self.dataset("train")

    def eval_datasets(self) -> dict:
        """valid and test as fixed evaluation sets: masks drawn once with a seed of their own and
        stored in the dataset directory, so every run and every evaluation scores the same positions."""
        from dslm.data.evalset import FrozenEvalSet

        return {split: FrozenEvalSet(self.data_dir, split, self.seq_len) for split in ("valid", "test")}

    def loss_and_metrics(self, model, batch):
        return pretraining_loss_and_metrics(model, batch, self.max_predictions)

    def summarize(self, sums):
        return summarize_pretraining(sums)

    def make_loader(self, dataset, batch_size, rank, world_size, start_step, num_steps, train):
        from dslm.data.loader import make_eval_loader, make_loader

        if not train:  # one pass over every sample (the last batch may be short), or its first batches
            return make_eval_loader(dataset, batch_size, rank, world_size, max_batches=num_steps,
                                    pin_memory=self.pin_memory)
        return make_loader(dataset, batch_size, rank, world_size, self.num_workers, start_step, num_steps,
                           pin_memory=self.pin_memory)

    def flops_per_token(self, model) -> float:
        return bert_flops_per_token(self.config, self.seq_len, self.max_predictions / self.seq_len)

    def compile_model(self, model) -> None:
        """Up to 24 layers: one graph for the whole model and loss (BERT-base on an H100: 486k
        tokens/s against 456k per layer). Deeper: each transformer layer (one graph reused by all of
        them) and the head + loss, so that compile time does not grow with depth."""
        if len(model.bert.layers) <= 24:
            model.compile()
            return
        for layer in model.bert.layers:
            layer.compile()
        model.head_loss = torch.compile(model.head_loss)


# ---- the `dslm pretrain` command ---------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference",
                        help="defaults for every flag not given: the paper's recipe, or a CPU-sized run")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help=f"prepared dataset directory (default: the embedded corpus, prepared on first use in {DEFAULT_DATA})")
    m = parser.add_argument_group("model")
    add_model_arguments(m)
    m.add_argument("--seq-len", type=int, help="sequence length L")
    m.add_argument("--dropout", type=float, help="hidden and attention dropout")
    parser.add_argument("--grad-profile", action="store_true",
                        help="probe the model at init and after training on 32 fixed valid sequences: per-layer "
                             "gradient norms, forward variance and correlation, written to final_metrics.json "
                             "(grad_profile)")
    add_train_arguments(parser, RECIPE)
    # flags a preset sets: absent from the namespace unless given, resolved in run()
    for action in parser._actions:
        if action.dest in PRESET_KEYS:
            shown = {k: p.get(action.dest, RECIPE.get(action.dest, action.default)) for k, p in PRESETS.items()}
            action.help = f"{action.help or ''} (default: {shown['reference']}; tiny: {shown['tiny']})"
            action.default = argparse.SUPPRESS


def _resolve(args) -> argparse.Namespace:
    preset = PRESETS[args.preset]
    from dslm.train.engine import TrainConfig

    base = {**TrainConfig().__dict__, **RECIPE, **preset}
    for key in PRESET_KEYS + list(TrainConfig().__dict__):
        if not hasattr(args, key):
            setattr(args, key, base.get(key))
    return args


def run(args) -> int:
    require_package("safetensors", "train")   # checkpoints and the saved model
    args = _resolve(args)
    cfg = train_config_from_args(args)
    if args.seq_len is None or args.seq_len < 8:
        raise UsageError(f"--seq-len {args.seq_len}: must be >= 8")
    config_from_args(args, vocab_size=30522, seq_len=args.seq_len)   # reject an impossible model before preparing any data
    if args.data is None:
        from dslm.data import ensure_embedded_dataset

        data = ensure_embedded_dataset(DEFAULT_DATA) if is_main_process() else None
        _barrier_files(DEFAULT_DATA)
        data = data or DEFAULT_DATA
    else:
        data = args.data
    from dslm.data.manifest import read_manifest

    vocab_size = read_manifest(Path(data))["vocab_size"]
    config = config_from_args(args, vocab_size, args.seq_len)
    if args.grad_profile and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--grad-profile: probes a whole model, so it runs in a single process only")
    task = PretrainTask(data, config, args.seq_len, seed=cfg.seed, num_workers=cfg.num_workers,
                        r0_auto=args.r0 == "auto", grad_profile=args.grad_profile)
    try:
        result = train(task, cfg)
    except NonFiniteLoss as e:
        print(f"dslm pretrain: {e}", flush=True)
        return 1
    if task.grad_profile and not result.get("stopped"):
        task.profiles["final"] = task.signal_profile(task.model)
        result["grad_profile"] = task.profiles
    if is_main_process():
        path = Path(cfg.out_dir) / "final_metrics.json"
        write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")
        print(f"final metrics: {path}")
    return exit_status(result)



def _barrier_files(data_dir: str) -> None:
    """Other ranks wait until rank 0 has prepared the embedded dataset (before any process group)."""
    import os
    import time

    if is_main_process():
        return
    deadline = time.time() + 600
    while not (Path(data_dir) / "dataset.json").is_file():
        if time.time() > deadline:
            raise UsageError(f"{data_dir}: timed out waiting for rank 0 to prepare the dataset")
        time.sleep(0.5)
    del os
