"""Decoder (GPT) pretraining as a task of the training engine: next-token cross-entropy on the
windows of :class:`dslm.data.NextTokenDataset` (the same prepared datasets BERT trains on), with
:class:`dslm.model.GPTLMHeadModel`.

The training order is the engine's generic loader (:func:`dslm.train.loader.default_loader`: a seeded
permutation of the windows per epoch, step ``s`` = items ``[s G, (s + 1) G)`` of that stream, built
in ``num_workers`` background processes), so a run resumed with ``--load`` sees exactly the batches
of the uninterrupted run. valid and test are scored in window order in the training process
(:func:`dslm.data.loader.make_eval_loader`, as for BERT: cutting a window is index arithmetic, and
no worker processes start and stop at every evaluation).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from dslm.errors import UsageError
from dslm.model import GPTConfig, GPTLMHeadModel
from dslm.model.flops import gpt_flops_per_token
from dslm.pretrain.shared import compile_whole_or_per_layer, parameter_count, with_measured_r0


def next_token_loss_and_metrics(model, batch: dict):
    """The mean next-token cross-entropy of a :class:`GPTLMHeadModel` on a batch of windows and the
    metric sums the engine accumulates (0-dim device tensors, no host sync)."""
    out = model(batch["input_ids"], batch["targets"])
    return out.loss, {"loss_sum": out.loss_sum, "correct": out.correct, "count": out.count}


def summarize_next_token(sums: dict) -> dict:
    """The reported numbers of summed metrics: ``loss`` (mean cross-entropy per target, nats),
    ``acc`` (arg-max accuracy), ``ppl`` = exp(loss) and ``tokens`` (targets scored; in the training
    log the engine reports under this key the tokens seen since step 0)."""
    if not sums.get("count"):
        return {}
    loss = sums["loss_sum"] / sums["count"]
    return {"loss": loss, "acc": sums["correct"] / sums["count"], "ppl": math.exp(min(loss, 700.0)),
            "tokens": sums["count"]}


class GPTPretrainTask:
    """Next-token pretraining of a :class:`GPTLMHeadModel` on a prepared dataset directory
    (``dslm prepare-data``): windows of ``seq_len`` + 1 tokens of the train, valid and test splits."""

    name = "pretrain_gpt"

    def __init__(self, data_dir, config: GPTConfig, seq_len: int, seed: int = 1234, num_workers: int = 2,
                 r0_auto: bool = False, pin_memory: bool | None = None):
        if seq_len > config.max_position_embeddings:
            raise UsageError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                             f"{config.max_position_embeddings}")
        self.data_dir, self.config, self.seq_len, self.r0_auto = Path(data_dir), config, seq_len, r0_auto
        self.seed, self.num_workers = seed, num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.tokens_per_item = seq_len
        self.model: GPTLMHeadModel | None = None   # the model build_model made (trained in place)
        self._datasets = {}

    def dataset(self, split: str):
        """The windows of ``split`` (opened once)."""
        from dslm.data import NextTokenDataset

        if split not in self._datasets:
            self._datasets[split] = NextTokenDataset(self.data_dir, split, self.seq_len)
        return self._datasets[split]

    def build_model(self) -> GPTLMHeadModel:
        """A fresh decoder; with ``--r0 auto`` and the DSLM init, r0 is first measured on 64 train
        windows with the decoder's embeddings (word + position)."""
        if self.r0_auto and self.config.uses_dslm_init:
            train = self.dataset("train")
            batch = train.get_batch(range(min(64, len(train))))
            self.config = with_measured_r0(self.config, GPTLMHeadModel(self.config).transformer.embeddings, batch)
        self.model = GPTLMHeadModel(self.config)
        return self.model

    def train_dataset(self):
        return self.dataset("train")

    def eval_datasets(self) -> dict:
        return {split: self.dataset(split) for split in ("valid", "test")}

    def make_loader(self, dataset, batch_size, rank, world_size, start_step, num_steps, train):
        """Training: the engine's generic loader (seeded epochs, exact resume); evaluation: one pass in
        window order in this process (see the module docstring)."""
        from dslm.data.loader import make_eval_loader
        from dslm.train.loader import default_loader

        if not train:
            return make_eval_loader(dataset, batch_size, rank, world_size, max_batches=num_steps,
                                    pin_memory=self.pin_memory)
        return default_loader(dataset, batch_size, rank, world_size, start_step, num_steps, True,
                              num_workers=self.num_workers, seed=self.seed, pin_memory=self.pin_memory)

    def loss_and_metrics(self, model, batch):
        return next_token_loss_and_metrics(model, batch)

    def summarize(self, sums):
        return summarize_next_token(sums)

    def config_dict(self) -> dict:
        return {**self.config.to_dict(), "seq_len": self.seq_len}

    def parameter_count(self) -> int:
        """Parameters of the model this task builds, counted on the meta device (nothing allocated)."""
        return parameter_count(GPTLMHeadModel, self.config)

    def run_files(self) -> dict:
        """The run folder carries the dataset's vocabulary (token ids mean nothing without it)."""
        return {"vocab.txt": self.data_dir / "vocab.txt"}

    def flops_per_token(self, model) -> float:
        return gpt_flops_per_token(self.config, self.seq_len)

    def compile_model(self, model) -> None:
        """The whole model and loss up to 24 layers, else each layer
        (:func:`~dslm.pretrain.shared.compile_whole_or_per_layer`)."""
        compile_whole_or_per_layer(model, model.transformer.layers)
