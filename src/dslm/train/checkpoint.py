"""Checkpoints: everything needed to continue a run exactly where it stopped.

``<out_dir>/checkpoints/step_00001234/``::

    model.safetensors + config.json   the weights (``from_pretrained`` reads this directory when the
                                      model has ``save_pretrained``; else safetensors of the state dict)
    trainer.pt                        optimizer and scheduler state, engine counters
    rng_rank<r>.pt                    each rank's python / numpy / torch CPU / CUDA RNG states
    meta.json                         format version, step, task name, task + train config (written last)

``trainer.pt`` and ``rng_rank<r>.pt`` hold only tensors and plain containers (numbers, strings,
lists, tuples, dicts), and :func:`load` reads them with ``torch.load(weights_only=True)``: a file
that would need any other object (and so could run code while being unpickled) is refused.

A checkpoint is written into ``.tmp-step_...``, its files and folder are fsynced, and it is renamed
when complete, so a directory named ``step_*`` is always whole. Re-saving an existing step moves the
old folder aside to ``.old-step_...`` first and deletes it only after the new one is in place; a
crash between the two renames leaves the old one aside, and it is put back by the next
:func:`save` or :func:`resolve`. Only the newest ``keep_last`` are kept. :func:`load` checks the
metadata against the current run and turns any unreadable, truncated, unsafe or incompatible file
into a one-line :class:`~dslm.errors.ConfigError` naming the ``load`` field (``--load`` on the
command line).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from dslm.files import fsync_path
from dslm.errors import ConfigError
from dslm.train import distributed as D

FORMAT = "dslm-train-checkpoint"
VERSION = 1
META = "meta.json"
TRAINER = "trainer.pt"
WEIGHTS = "model.safetensors"


def rng_state() -> dict:
    """This process's RNG states, in types that a weights-only ``torch.load`` accepts (numpy's key
    array as a list of ints)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, key.tolist(), int(pos), int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_fsdp(model) -> bool:
    return getattr(model, "dslm_fsdp", False)


def model_state(model) -> dict:
    """A full (unsharded) CPU state dict; collective under FSDP."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in D.unwrap(model).state_dict().items()}


def optimizer_state(model, optimizer) -> dict:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                   and p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))


def save(root: str | Path, step: int, model, optimizer, scheduler, env: D.DistEnv, meta: dict,
         trainer: dict, keep_last: int = 2) -> Path | None:
    """Write the checkpoint of ``step`` (collective: every rank calls it). Returns its path on rank 0."""
    root = Path(root)
    name = f"step_{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if env.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    D.barrier(env)
    state = model_state(model)
    opt = optimizer_state(model, optimizer)
    torch.save(rng_state(), tmp / f"rng_rank{env.rank}.pt")
    if env.is_main:
        inner = D.unwrap(model)
        seen, unique = set(), {}
        for k, v in state.items():  # tied tensors once (safetensors refuses shared storage)
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if key not in seen:
                seen.add(key)
                unique[k] = v.contiguous()
        if hasattr(inner, "save_pretrained"):   # a model directory (also under FSDP: the gathered state)
            inner.save_pretrained(tmp, state=unique)
        else:
            from safetensors.torch import save_file

            save_file(unique, str(tmp / WEIGHTS), metadata={"format": "pt"})
        torch.save({"optimizer": opt, "scheduler": scheduler.state_dict(), **trainer}, tmp / TRAINER)
        full_meta = {"format": FORMAT, "version": VERSION, "step": step, "world_size": env.world_size, **meta}
        (tmp / META).write_text(json.dumps(full_meta, indent=2, default=str) + "\n")
    D.barrier(env)
    if not env.is_main:
        return None
    _fsync_tree(tmp)
    recover(root)
    if final.exists():   # never a moment without a whole step_N on disk: old aside, new in, old deleted
        aside = root / f".old-{name}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        os.replace(tmp, final)
        fsync_path(root)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
        fsync_path(root)
    for old in step_dirs(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(path: Path) -> None:
    """Flush every file of a freshly written checkpoint folder, then the folder, to disk."""
    for f in path.iterdir():
        if f.is_file():
            fsync_path(f)
    fsync_path(path)


def recover(root: str | Path) -> None:
    """Finish a re-save interrupted between its renames: an ``.old-step_N`` whose ``step_N`` is
    missing is put back; one whose ``step_N`` is in place is deleted."""
    root = Path(root)
    if not root.is_dir():
        return
    for aside in root.glob(".old-step_*"):
        final = root / aside.name[len(".old-"):]
        try:
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(aside, final)
        except OSError:   # another rank got there first
            pass


def resolve(path: str | Path) -> Path:
    """``path`` may be a checkpoint, a ``checkpoints`` folder or a run's output folder: the newest
    checkpoint inside is used."""
    p = Path(path)
    if p.name.startswith("step_"):
        recover(p.parent)
    if not p.exists():
        raise ConfigError(f"{{load}} {p}: no such checkpoint or directory")
    if (p / META).is_file() or (p / TRAINER).is_file():
        return p
    for root in (p, p / "checkpoints"):
        recover(root)
        dirs = step_dirs(root)
        if dirs:
            return dirs[-1]
    raise ConfigError(f"{{load}} {p}: no checkpoint (step_* directory with {META}) found there")


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / META).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{{load}} {ckpt}: {META} is missing (incomplete or not a dslm checkpoint)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{{load}} {ckpt / META}: corrupt ({e.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{{load}} {ckpt}: not a dslm training checkpoint")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{{load}} {ckpt}: checkpoint format version {meta.get('version')}, this dslm reads {VERSION}")
    return meta


def check_compatible(meta: dict, expected: dict, ckpt: Path) -> None:
    """Refuse a checkpoint of another task or model (keys of ``expected`` that differ)."""
    for key, value in expected.items():
        saved = meta.get(key)
        if saved is None or value is None:
            continue
        if isinstance(value, dict) and isinstance(saved, dict):
            diff = sorted(k for k in set(value) | set(saved) if value.get(k) != saved.get(k))
            if diff:
                k = diff[0]
                raise ConfigError(f"{{load}} {ckpt}: incompatible {key}: {k} is {saved.get(k)!r} in the checkpoint, "
                                  f"{value.get(k)!r} in this run")
        elif saved != value:
            raise ConfigError(f"{{load}} {ckpt}: incompatible {key}: {saved!r} in the checkpoint, {value!r} in this run")


def _numpy_array_globals() -> list:
    """What unpickling a plain numpy array needs (the numpy RNG state as earlier checkpoints stored
    it): array reconstruction, no other code."""
    key = np.random.get_state()[1]
    return [key.__reduce__()[0], np.ndarray, np.dtype, type(key.dtype)]


def _torch_load(path: Path):
    """``torch.load`` of a checkpoint's trainer / RNG file, weights only: tensors and plain
    containers (and numpy arrays) load, any other object in the pickle is refused before it is
    created."""
    if hasattr(torch.serialization, "safe_globals"):
        allow = torch.serialization.safe_globals(_numpy_array_globals())
    else:   # torch 2.4: no context manager
        torch.serialization.add_safe_globals(_numpy_array_globals())
        allow = contextlib.nullcontext()
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{{load}} {path}: file missing (incomplete checkpoint)") from None
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            found = re.search(r"GLOBAL (\S+)", str(e))
            if found:
                raise ConfigError(f"{{load}} {path}: refused: it holds {found.group(1)}, which a dslm checkpoint never "
                                  f"does (unpickling it could run code)") from None
            raise ConfigError(f"{{load}} {path}: corrupt, or holds more than tensors and plain containers "
                              f"(refused: unpickling it could run code)") from None
        raise ConfigError(f"{{load}} {path}: corrupt or unreadable ({e.__class__.__name__})") from None
    except Exception as e:  # noqa: BLE001 - any other unpickling failure means the file is damaged
        raise ConfigError(f"{{load}} {path}: corrupt or unreadable ({e.__class__.__name__})") from None


def load(path: str | Path, model, optimizer, scheduler, env: D.DistEnv, expected: dict) -> tuple[Path, dict, dict]:
    """Restore weights, optimizer and scheduler in place; returns (checkpoint path, meta, trainer dict).
    The RNG state is returned in ``trainer["rng"]`` for the caller to apply at the right moment."""
    ckpt = resolve(path)
    meta = read_meta(ckpt)
    check_compatible(meta, expected, ckpt)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(ckpt / WEIGHTS))
    except FileNotFoundError:
        raise ConfigError(f"{{load}} {ckpt / WEIGHTS}: file missing (incomplete checkpoint)") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{{load}} {ckpt / WEIGHTS}: corrupt or unreadable ({str(e).splitlines()[0][:120]})") from None
    trainer = _torch_load(ckpt / TRAINER)
    rng_file = ckpt / f"rng_rank{env.rank}.pt"
    trainer["rng"] = _torch_load(rng_file) if rng_file.is_file() else None
    try:
        if _is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, strict=True)
            set_model_state_dict(model, weights, options=opts)
            set_optimizer_state_dict(model, optimizer, trainer["optimizer"], options=opts)
        else:
            inner = D.unwrap(model)
            missing = [k for k in inner.state_dict() if k not in weights]
            tied = {k for k in missing if _is_tied(inner, k)}
            if set(missing) - tied or set(weights) - set(inner.state_dict()):
                extra = sorted(set(weights) - set(inner.state_dict()))
                raise ConfigError(f"{{load}} {ckpt}: weights do not match the model (missing "
                                  f"{sorted(set(missing) - tied)[:3]}, unexpected {extra[:3]})")
            inner.load_state_dict(weights, strict=False)
            optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{{load}} {ckpt}: incompatible with this run ({str(e).splitlines()[0][:160]})") from None
    return ckpt, meta, trainer


def _is_tied(model, key: str) -> bool:
    """Whether state-dict entry ``key`` shares its tensor with another entry (dropped by safetensors)."""
    sd = model.state_dict()
    t = sd[key]
    return any(k != key and v.data_ptr() == t.data_ptr() for k, v in sd.items())
