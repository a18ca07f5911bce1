"""BERT pretraining (masked LM + segment-order head) as a task of the training engine:
:class:`PretrainTask` on a prepared dataset directory, its loss and metric sums
(:func:`pretraining_loss_and_metrics`) and their summary (:func:`summarize_pretraining`). The
``dslm pretrain`` command that runs it is :mod:`dslm.pretrain.command`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dslm.errors import UsageError
from dslm.model import BertConfig, BertForPreTraining
from dslm.model.flops import bert_flops_per_token
from dslm.pretrain.shared import compile_whole_or_per_layer, parameter_count, with_measured_r0
from dslm.runtime import is_main_process, resolve_device


def pretraining_loss_and_metrics(model, batch: dict, max_predictions: int):
    """The training loss of a :class:`BertForPreTraining` (MLM + binary head, static prediction
    slots: no host sync) and the metric sums the engine accumulates."""
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["mlm_labels"],
                batch["binary_labels"], max_predictions=max_predictions)
    return out.loss, {"mlm_loss_sum": out.mlm_loss_sum, "mlm_count": out.mlm_count, "mlm_correct": out.mlm_correct,
                      "binary_loss_sum": out.binary_loss_sum, "binary_count": out.binary_count,
                      "binary_correct": out.binary_correct}


def summarize_pretraining(sums: dict) -> dict:
    """The reported numbers of summed metrics: MLM loss, accuracy and perplexity, binary loss and
    accuracy, and their total ``loss`` (the terms whose counts are positive)."""
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
            batch = self.dataset("train").get_batch(range(min(64, len(self.dataset("train")))))
            self.config = with_measured_r0(self.config, BertForPreTraining(self.config).bert.embeddings, batch)
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
        return parameter_count(BertForPreTraining, self.config)

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
        """The whole model up to 24 layers, else each layer and the head + loss
        (:func:`~dslm.pretrain.shared.compile_whole_or_per_layer`)."""
        compile_whole_or_per_layer(model, model.bert.layers, head="head_loss")
