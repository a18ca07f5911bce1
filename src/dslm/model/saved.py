"""The saved-model directory every dslm model uses: ``config.json`` (the class name under
``architectures`` and the config's fields) and ``model.safetensors`` (the weights).

:class:`Pretrained` gives a model class ``save_pretrained`` / ``from_pretrained``; each such class
registers itself by name, so :func:`from_pretrained` loads whichever class a directory holds.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from dslm.errors import UsageError
from dslm.files import write_text_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURES: dict[str, type] = {}


def save_weights_dir(module: nn.Module, directory, meta: dict, state: dict | None = None) -> Path:
    """Write ``module``'s weights (or ``state``, e.g. a state dict gathered from FSDP shards) to
    ``directory/model.safetensors`` and ``meta`` to ``directory/config.json``, each through a
    temporary file and a rename."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state or module.state_dict()).items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS_FILE)
    write_text_atomic(directory / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return directory


def _read_meta(directory) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{path}: file not found (expected a dslm model config)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path}: not a dslm model config")
    return meta


class Pretrained:
    """``save_pretrained(dir)`` / ``from_pretrained(dir)`` for a model class with a dataclass
    ``config`` of type ``config_class``. ``stack_prefix``: on a head model, the attribute holding
    its base model (``"bert"``), so the base class can load a head model's directory too."""

    config_class: type
    stack_prefix: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if Pretrained in cls.__bases__:
            ARCHITECTURES[cls.__name__] = cls

    def pretrained_meta(self) -> dict:
        """What ``config.json`` holds: the class and the config. The class is the model's own, not
        a wrapper's (FSDP's ``fully_shard`` swaps in a subclass named ``FSDP<name>``)."""
        arch = next(c for c in type(self).__mro__ if Pretrained in c.__bases__)
        return {"architectures": [arch.__name__], **self.config.to_dict()}

    def save_pretrained(self, directory, state: dict | None = None) -> Path:
        return save_weights_dir(self, directory, self.pretrained_meta(), state)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu"):
        """Load a saved model. A base model class also accepts its head model's directory and takes
        the base model out of it (``BertModel`` from a ``BertForPreTraining``)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = load_config(directory, cls.config_class)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise UsageError(f"{weights}: file not found (expected a saved dslm model)")
        state = load_file(str(weights), device=str(map_location))
        inner = next((c.stack_prefix for c in ARCHITECTURES.values()
                      if c.stack_prefix and c.config_class is cls.config_class), None)
        if cls.stack_prefix is None and inner and any(k.startswith(inner + ".") for k in state):
            state = {k[len(inner) + 1:]: v for k, v in state.items() if k.startswith(inner + ".")}
        model = cls(config)
        model.load_state_dict(state)
        return model


def load_config(directory, config_class: type | None = None):
    """The config saved in ``directory``, as ``config_class`` (default: the class its
    ``architectures`` entry names)."""
    path = Path(directory) / CONFIG_FILE
    data = _read_meta(directory)
    names = data.pop("architectures", None) or ["BertForPreTraining"]
    if config_class is None:
        arch = ARCHITECTURES.get(names[0]) if isinstance(names, list) and names else None
        if arch is None:
            raise UsageError(f"{path}: unknown architecture {names!r}")
        config_class = arch.config_class
    try:
        return config_class.from_dict(data)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: not a valid dslm {config_class.__name__} ({e})") from None


def from_pretrained(directory, map_location="cpu"):
    """Load whichever model class was saved in ``directory`` (``BertForPreTraining`` where the
    config names none)."""
    names = _read_meta(directory).get("architectures") or ["BertForPreTraining"]
    cls = ARCHITECTURES.get(names[0]) if isinstance(names, list) else None
    if cls is None:
        raise UsageError(f"{Path(directory) / CONFIG_FILE}: unknown architecture {names!r}")
    return cls.from_pretrained(directory, map_location)
