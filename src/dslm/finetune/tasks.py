"""The finetuning jobs as the engine's :class:`~dslm.train.task.Task`, their data, and predictions.

``load_data(spec, data, ...)`` reads and tokenises (or loads from the cache) the train split and the
task's evaluation splits; :class:`FinetuneTask` holds them and builds the model (pretrained encoder +
new head, seeded by the engine); :func:`write_predictions` writes one TSV per evaluation split after
training.

| task | head | train split | evaluation splits | metrics |
|---|---|---|---|---|
| mnli | 3-way on the pooler | train | dev_matched, dev_mismatched | acc |
| qqp  | 2-way on the pooler | train | dev | acc, f1 (positive = duplicate) |
| race | 4 options, 1 unit each | train | dev, test | acc, acc_middle, acc_high |
| demo | 3-way (MNLI layout, shipped data) | train | dev_matched, dev_mismatched | acc |

The engine evaluates a split named ``test`` only at the end of the run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dslm.errors import ConfigError, UsageError
from dslm.finetune import metrics as M
from dslm.finetune.features import (EncodedDataset, cache_key, cached_encode, encode_pairs, encode_race)
from dslm.finetune.readers import (MNLI_LABELS, QQP_LABELS, RACE_LETTERS, RACE_LEVELS, ReadReport, file_checksum,
                                   glue_split_path, read_hf_pairs, read_hf_race, read_mnli_tsv, read_qqp_tsv,
                                   read_race_tree)
from dslm.files import atomic_output

DEMO_DATA = Path(__file__).resolve().parent / "demo"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                 # "classify" | "binary" | "race"
    label_names: tuple
    eval_splits: tuple
    train_split: str = "train"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


SPECS = {
    "mnli": TaskSpec("mnli", "classify", MNLI_LABELS, ("dev_matched", "dev_mismatched")),
    "qqp": TaskSpec("qqp", "binary", QQP_LABELS, ("dev",)),
    "race": TaskSpec("race", "race", tuple(RACE_LETTERS), ("dev", "test")),
    "demo": TaskSpec("demo", "classify", MNLI_LABELS, ("dev_matched", "dev_mismatched")),
}


def default_cache_dir(data: str) -> Path:
    """``<data>/.dslm_cache`` when the data folder is writable, else ``outputs/finetune_cache``."""
    if data != "hf" and os.access(data, os.W_OK) and Path(data).resolve() != DEMO_DATA:
        return Path(data) / ".dslm_cache"
    return Path("outputs") / "finetune_cache"


def load_split(spec: TaskSpec, data: str, split: str, tokenizer, max_len: int, qa_max_len: int = 128,
               cache_dir: Path | None = None, levels: tuple = RACE_LEVELS, log=print):
    """(Encoded, meta) of one split. ``data`` is a folder in the distributed layout or ``hf``.
    On torchrun ranks other than 0 the cache written by rank 0 is awaited, not rebuilt."""
    rank = int(os.environ.get("RANK", "0") or 0)
    hf = data == "hf"
    name = spec.name if spec.name != "race" or set(levels) == set(RACE_LEVELS) else f"race_{levels[0]}"

    if spec.name == "race":
        if hf:
            race = read_hf_race(split, tuple(levels))
            fingerprint, loaded = race.fingerprint, race
        else:
            race = read_race_tree(data, split, tuple(levels))  # reading is part of the fingerprint
            fingerprint, loaded = race.fingerprint, race

        def build():
            return encode_race(tokenizer, loaded.questions, max_len, qa_max_len), {"report": loaded.report.to_dict()}
        key = cache_key(fingerprint, tokenizer, max_len, qa_max_len)
    else:
        task = "qqp" if spec.name == "qqp" else "mnli"
        if hf:
            if spec.name == "demo":
                raise ConfigError("{data} hf: the demo task reads its shipped files (leave {data} out)")
            pairs = read_hf_pairs(task, split)
            fingerprint = pairs.fingerprint
        else:
            path = glue_split_path(task, data, split)
            fingerprint, pairs = file_checksum(path), None

        def build():
            nonlocal pairs
            if pairs is None:
                pairs = read_qqp_tsv(path) if task == "qqp" else read_mnli_tsv(path)
            if not pairs.labels:
                raise UsageError(f"{pairs.report.source}: no usable rows ({pairs.report.summary()})")
            enc = encode_pairs(tokenizer, pairs.text_a, pairs.text_b, pairs.labels, pairs.ids, max_len)
            return enc, {"report": pairs.report.to_dict()}
        key = cache_key(fingerprint, tokenizer, max_len)
    enc, meta = cached_encode(cache_dir, f"{name}-{split}", key, build, wait=rank != 0, log=log)
    if len(enc) == 0:
        raise UsageError(f"{ReadReport.from_dict(meta['report']).source}: no usable examples")
    return enc, meta


class FinetuneTask:
    """One finetuning job on the engine. ``encoder_factory()`` returns the encoder (the loaded
    pretrained one, or a fresh one drawn by its scheme); the head is drawn inside ``build_model``,
    after the engine has seeded the RNG, so each seed gets its own head."""

    def __init__(self, spec: TaskSpec, config, encoder_factory, train_set: EncodedDataset,
                 eval_sets: dict, max_len: int):
        self.spec, self.config, self.encoder_factory = spec, config, encoder_factory
        self.name = f"finetune-{spec.name}"
        self.train_set, self.eval_sets, self.max_len = train_set, eval_sets, max_len
        # tokens the model processes per example: padded ones with --pad-to-max, else the real ones
        self.tokens_per_item = (max_len * train_set.enc.choices if train_set.pad_to_max
                                else max(1, round(train_set.mean_tokens())))
        self.model = None

    # -- Task protocol ---------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        from dslm.finetune.heads import MultipleChoice, SequenceClassifier

        encoder = self.encoder_factory()
        if self.spec.kind == "race":
            self.model = MultipleChoice(self.config, len(self.spec.label_names), encoder=encoder)
        else:
            self.model = SequenceClassifier(self.config, self.spec.num_labels, encoder=encoder)
        return self.model

    def train_dataset(self):
        return self.train_set

    def eval_datasets(self) -> dict:
        return dict(self.eval_sets)

    def loss_and_metrics(self, model, batch):
        logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        labels = batch["labels"]
        sums = M.batch_sums(logits, labels, self.spec.kind, batch.get("level"))
        return sums["loss_sum"] / labels.shape[0], sums

    def summarize(self, sums: dict) -> dict:
        return M.summarize(sums)

    # -- optional engine hooks -------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {**self.config.to_dict(), "task": self.spec.name, "max_len": self.max_len}

    def flops_per_token(self, model) -> float:
        from dslm.model.flops import bert_flops_per_token

        choices = self.train_set.enc.choices
        return bert_flops_per_token(self.config, max(1, round(self.train_set.mean_tokens() / choices)), 0.0)


# ---- predictions ---------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, dataset: EncodedDataset, batch_size: int = 64, precision: str = "fp32") -> np.ndarray:
    """Logits (n, classes) for every example of ``dataset``, in order (model in eval mode)."""
    from dslm.train.precision import autocast

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.get_batch(range(start, min(start + batch_size, len(dataset))))
            with autocast(device, precision):
                logits = model(*(batch[k].to(device) for k in ("input_ids", "token_type_ids", "attention_mask")))
            out.append(logits.float().cpu())
    finally:
        model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, 1), dtype=np.float32)


def write_predictions(path: Path, spec: TaskSpec, dataset: EncodedDataset, logits: np.ndarray) -> dict:
    """``id  prediction  label  correct [level]`` per example (label names as in the data);
    returns the accuracy (and F1 / per-level accuracy) recomputed from the file's rows."""
    enc = dataset.enc
    pred = logits.argmax(-1) if len(logits) else np.zeros(0, dtype=np.int64)
    names = spec.label_names if spec.kind != "binary" else ("0", "1")
    race = spec.kind == "race"
    with atomic_output(path) as f:
        f.write("id\tprediction\tlabel\tcorrect" + ("\tlevel" if race else "") + "\n")
        for i in range(len(enc)):
            gold = int(enc.labels[i])
            row = [str(enc.guids[i]).replace("\t", " "), names[int(pred[i])],
                   names[gold] if gold >= 0 else "", str(int(pred[i] == gold))]
            if race:
                row.append(RACE_LEVELS[int(enc.levels[i])])
            f.write("\t".join(row) + "\n")
    labels = enc.labels
    result = {"acc": M.accuracy(pred.tolist(), labels.tolist())}
    if spec.kind == "binary":
        result["f1"] = M.f1_score(pred.tolist(), labels.tolist())
    if race:
        for lv, name in enumerate(RACE_LEVELS):
            at = enc.levels == lv
            if at.any():
                result[f"acc_{name}"] = M.accuracy(pred[at].tolist(), labels[at].tolist())
    return result
