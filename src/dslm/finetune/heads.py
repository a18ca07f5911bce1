"""Finetuning heads on the pooled output, and loading the pretrained encoder they sit on.

* :class:`SequenceClassifier` -- pooled [CLS] -> dropout -> Linear(d, num_labels) (MNLI 3-way, QQP 2-way)
* :class:`MultipleChoice`     -- each option's sequence is encoded separately, pooled -> dropout ->
  Linear(d, 1); the (batch, options) scores are trained with a softmax over the options (RACE, 4)

The new head is drawn by the encoder's init scheme (THEORY.md section 3, the binary-head row with
``n`` outputs): megatron N(0, 0.02^2), xavier N(0, 2/(d + n)), dslm N(0, 1/d); bias 0.

:func:`load_encoder` takes our ``save_pretrained`` directories (a ``BertModel``, a
``BertForPreTraining`` or a finetuned model of this module), the engine's checkpoints (a
``step_*`` directory, its ``checkpoints`` folder or the run's output folder: the newest step) and a
local HF BERT directory (``config.json`` with ``model_type``; loaded by ``transformers`` and
converted exactly by :func:`dslm.model.hf.from_hf`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from dslm.errors import UsageError
from dslm.model import BertConfig, BertModel
from dslm.model.saved import CONFIG_FILE, WEIGHTS_FILE, save_weights_dir
from dslm.theory.schemes import MEGATRON_STD


def head_std(config: BertConfig, n_out: int) -> float:
    """Std of a new d -> n_out head under the config's weight scheme."""
    d = config.hidden_size
    scheme = config.weight_scheme
    if scheme == "megatron":
        return MEGATRON_STD
    if scheme in ("xavier", "deepnorm"):   # DeepNorm's heads are Xavier's
        return math.sqrt(2.0 / (d + n_out))
    return 1.0 / math.sqrt(d)


class _Finetuned(nn.Module):
    """Shared by the heads: encoder, dropout, linear head, save/load."""

    kind = ""

    def __init__(self, config: BertConfig, n_out: int, encoder: BertModel | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.bert = encoder if encoder is not None else BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.head = nn.Linear(config.hidden_size, n_out)
        with torch.no_grad():
            self.head.weight.normal_(0.0, head_std(config, n_out), generator=generator)
            self.head.bias.zero_()

    def head_config(self) -> dict:
        raise NotImplementedError

    def pretrained_meta(self) -> dict:
        """What ``config.json`` holds: the class, the head and the encoder config."""
        return {"architectures": [type(self).__name__], "head": self.head_config(), "bert": self.config.to_dict()}

    def save_pretrained(self, directory, state: dict | None = None) -> Path:
        return save_weights_dir(self, directory, self.pretrained_meta(), state)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu"):
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        config = BertConfig.from_dict(meta["bert"])
        model = cls(config, **meta["head"], encoder=BertModel(config, init=False))
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(map_location)))
        return model


class SequenceClassifier(_Finetuned):
    """Sentence(-pair) classification on the pooled [CLS] output."""

    def __init__(self, config: BertConfig, num_labels: int, encoder: BertModel | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(config, num_labels, encoder, generator)
        self.num_labels = num_labels

    def head_config(self) -> dict:
        return {"num_labels": self.num_labels}

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        """Logits (batch, num_labels)."""
        pooled = self.bert(input_ids, token_type_ids, attention_mask).pooled_output
        return self.head(self.dropout(pooled))


class MultipleChoice(_Finetuned):
    """Multiple choice: inputs (batch, num_choices, T); one score per option from the 1-unit head on
    its pooled output; returns (batch, num_choices) logits for a softmax over the options."""

    def __init__(self, config: BertConfig, num_choices: int = 4, encoder: BertModel | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(config, 1, encoder, generator)
        self.num_choices = num_choices

    def head_config(self) -> dict:
        return {"num_choices": self.num_choices}

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        b, c, t = input_ids.shape
        flat = lambda x: None if x is None else x.reshape(b * c, t)  # noqa: E731
        pooled = self.bert(flat(input_ids), flat(token_type_ids), flat(attention_mask)).pooled_output
        return self.head(self.dropout(pooled)).view(b, c)


HEADS = {"SequenceClassifier": SequenceClassifier, "MultipleChoice": MultipleChoice}


# ---- loading the encoder -------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path, flag: str = "--init-from") -> Path:
    """The directory holding ``config.json`` + weights: ``path`` itself, or for an engine run
    folder / ``checkpoints`` folder the newest ``step_*`` inside."""
    from dslm.train.checkpoint import step_dirs

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {p}: no such checkpoint or directory")
    if not p.is_dir():
        raise UsageError(f"{flag} {p}: expected a checkpoint directory (config.json + model weights)")
    if (p / CONFIG_FILE).is_file():
        return p
    for root in (p, p / "checkpoints"):
        dirs = step_dirs(root)
        if dirs:
            return dirs[-1]
    raise UsageError(f"{flag} {p}: no config.json and no step_* checkpoint inside (expected a dslm "
                     f"checkpoint, a pretraining run folder or an HF BERT folder)")


def _with_dropout(config: BertConfig, dropout: float | None) -> BertConfig:
    if dropout is None:
        return config
    return BertConfig.from_dict({**config.to_dict(), "hidden_dropout": dropout, "attention_dropout": dropout})


def _load_hf_encoder(directory: Path, flag: str) -> BertModel:
    try:
        import transformers
    except ImportError:
        raise UsageError(f"{flag} {directory}: an HF checkpoint needs the 'transformers' package: "
                         f"pip install 'dslm[hf]'") from None
    from dslm.model.hf import from_hf

    try:
        hf = transformers.BertModel.from_pretrained(str(directory))
    except Exception as e:  # noqa: BLE001 - any loading problem is the user's file
        msg = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
        raise UsageError(f"{flag} {directory}: cannot load it as an HF BERT ({msg})") from None
    try:
        return from_hf(hf.float())
    except ValueError as e:
        raise UsageError(f"{flag} {directory}: {e}") from None


def load_encoder(path: str | Path, dropout: float | None = None, flag: str = "--init-from") -> tuple[BertModel, str]:
    """The pretrained encoder at ``path`` (see the module docstring) with hidden and attention
    dropout set to ``dropout`` (None keeps the saved values). Returns (model, description)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_checkpoint(path, flag)
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {directory / CONFIG_FILE}: unreadable ({e.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{flag} {directory / CONFIG_FILE}: not a model config")
    if "model_type" in meta:
        if meta["model_type"] != "bert":
            raise UsageError(f"{flag} {directory}: HF model_type {meta['model_type']!r}, expected 'bert'")
        hf = _load_hf_encoder(directory, flag)
        encoder = BertModel(_with_dropout(hf.config, dropout), init=False)
        encoder.load_state_dict(hf.state_dict())
        return encoder, f"HF BERT {directory}"
    data = dict(meta.get("bert", meta))
    data.pop("architectures", None)
    try:
        config = BertConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{flag} {directory / CONFIG_FILE}: not a dslm model config ({e})") from None
    try:
        state = load_file(str(directory / WEIGHTS_FILE))
    except FileNotFoundError:
        raise UsageError(f"{flag} {directory / WEIGHTS_FILE}: file not found") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{flag} {directory / WEIGHTS_FILE}: corrupt or unreadable "
                         f"({(str(e).splitlines() or ['?'])[0][:120]})") from None
    if any(k.startswith("bert.") for k in state):
        state = {k[5:]: v for k, v in state.items() if k.startswith("bert.")}
    encoder = BertModel(_with_dropout(config, dropout), init=False)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"{flag} {directory}: weights do not match the config (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    return encoder, f"dslm checkpoint {directory}"
