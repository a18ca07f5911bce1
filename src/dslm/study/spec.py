"""A study spec (TOML or JSON) and the runs it asks for.

A spec names a prepared dataset, the ``dslm pretrain`` settings every run shares, the schemes
(LayerNorm placement + init + DSLM options), and one or more families of shapes, each with a token
budget, a learning-rate search and the seeds to repeat at each cell's best learning rate::

    data = "outputs/data/english"
    prepare = "dslm prepare-data --source english ..."     # shown when the data is missing
    [train]          # shared dslm pretrain flags (names as in --help, '-' or '_')
    seq_len = 128
    [train.cuda]     # added when the runs go to GPUs
    cuda_graphs = true
    [schemes]
    preln = {ln = "pre", init = "megatron"}
    [families.S]
    tokens = 16_000_000
    shapes = {"6x256" = {layers = 6, hidden = 256, heads = 4}}
    lrs = [1e-4, 3e-4, 1e-3]      # or lrs_around = "S": family S's best lr at the nearest depth,
                                  # one ladder step either side (around_points = 3) or alone (1);
                                  # around_scheme = "x" takes it from scheme x instead of the same one
    extend = 2                    # lrs added past an edge of the grid where a cell's best lr sits
    seeds = [1, 2, 3]             # at the best lr; the first is the search seed
    [verdict]                     # optional: the published decision rules (see dslm.study.report)

A cell is (family, shape, scheme). :func:`plan` is a pure function of the spec and the finished
runs: the search runs of every cell, then (once a cell's search is done) one more learning rate past
an edge where its best one sits, then the other seeds at the best learning rate. The runner calls
it again after every finished run, so a study resumes from its records alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dslm.errors import UsageError

SCHEME_KEYS = {"ln", "init", "dslm_mode", "dslm_k", "lam2", "beta2", "r0"}
SHAPE_KEYS = {"layers", "hidden", "heads", "ffn"}
# run-specific flags the study sets itself; a spec may not set them in [train]
RESERVED = {"lr", "seed", "steps", "epochs", "out_dir", "data", "load", "eval_every", "eval_iters",
            "save_every", "progress", "device", "preset"} | SCHEME_KEYS | SHAPE_KEYS
VERDICT_KEYS = {"method", "baselines", "broken", "families"}


@dataclass(frozen=True)
class Family:
    name: str
    tokens: int
    shapes: dict[str, dict]
    schemes: tuple[str, ...]
    lrs: tuple[float, ...] = ()
    lrs_around: str | None = None
    around_points: int = 3
    around_scheme: str | None = None
    extend: int = 2
    refine: bool = False                          # half-step lrs for a cell whose whole sweep stalled
    seeds: tuple[int, ...] = (1,)
    evals: int = 8
    train: dict = field(default_factory=dict)   # flags over [train] for this family's runs

    @property
    def search_seed(self) -> int:
        return self.seeds[0]


@dataclass(frozen=True)
class Spec:
    name: str
    path: Path
    data: str
    prepare: str | None
    train: dict
    train_cuda: dict
    train_cpu: dict
    schemes: dict[str, dict]
    families: dict[str, Family]
    verdict: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One ``dslm pretrain`` run of a study."""
    family: str
    shape: str
    scheme: str
    lr: float
    seed: int

    @property
    def cell(self) -> tuple[str, str, str]:
        return self.family, self.shape, self.scheme

    @property
    def id(self) -> str:
        return f"{self.family}-{self.shape}-{self.scheme}-lr{self.lr:g}-s{self.seed}"


# ---- reading -----------------------------------------------------------------------------------
def load_spec(path: str | Path) -> Spec:
    """Read and check a spec file; every mistake is a one-line UsageError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such study spec")
    raw = _read(path)
    where = str(path)

    def fail(msg):
        raise UsageError(f"{where}: {msg}")

    unknown = set(raw) - {"name", "data", "prepare", "train", "schemes", "families", "verdict"}
    if unknown:
        fail(f"unknown keys {', '.join(sorted(unknown))}")
    if not isinstance(raw.get("data"), str):
        fail("'data' (the prepared dataset directory) is required")
    train = {_key(k): v for k, v in dict(raw.get("train", {})).items()}
    train_cuda = {_key(k): v for k, v in dict(train.pop("cuda", {})).items()}
    train_cpu = {_key(k): v for k, v in dict(train.pop("cpu", {})).items()}
    for table, name in ((train, "train"), (train_cuda, "train.cuda"), (train_cpu, "train.cpu")):
        bad = sorted(set(table) & RESERVED)
        if bad:
            fail(f"[{name}] may not set {', '.join(bad)} (the study sets them per run)")
    for key in ("seq_len", "global_batch"):
        if not isinstance(train.get(key), int) or train[key] < 1:
            fail(f"[train] needs a positive integer {key}")
    schemes = {}
    for name, s in dict(raw.get("schemes", {})).items():
        s = {_key(k): v for k, v in dict(s).items()}
        if set(s) - SCHEME_KEYS:
            fail(f"scheme {name}: unknown keys {', '.join(sorted(set(s) - SCHEME_KEYS))}")
        if "ln" not in s or "init" not in s:
            fail(f"scheme {name}: needs ln and init")
        schemes[name] = s
    if not schemes:
        fail("no [schemes]")
    families = {}
    for name, f in dict(raw.get("families", {})).items():
        families[name] = _family(name, dict(f), schemes, families, fail)
    if not families:
        fail("no [families]")
    verdict = dict(raw.get("verdict", {}))
    if set(verdict) - VERDICT_KEYS:
        fail(f"[verdict]: unknown keys {', '.join(sorted(set(verdict) - VERDICT_KEYS))}")
    for key in ("method", "broken"):
        if key in verdict and verdict[key] not in schemes:
            fail(f"[verdict] {key} = {verdict[key]!r} is not a scheme")
    for key in ("baselines",):
        for s in verdict.get(key, []):
            if s not in schemes:
                fail(f"[verdict] {key}: {s!r} is not a scheme")
    for fam in verdict.get("families", []):
        if fam not in families:
            fail(f"[verdict] families: {fam!r} is not a family")
    return Spec(str(raw.get("name", path.stem)), path, raw["data"], raw.get("prepare"), train, train_cuda,
                train_cpu, schemes, families, verdict)


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file (a study spec is TOML or JSON)") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        try:
            import tomllib
        except ModuleNotFoundError:   # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise UsageError(f"{path}: reading TOML on Python 3.10 needs 'tomli' (pip install tomli), "
                                 "or write the spec as JSON") from None
        return tomllib.loads(text)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: not a valid {'JSON' if path.suffix == '.json' else 'TOML'} spec ({e})") from None


def _key(name: str) -> str:
    return name.replace("-", "_")


def _family(name: str, f: dict, schemes: dict, earlier: dict, fail) -> Family:
    known = {"tokens", "shapes", "schemes", "lrs", "lrs_around", "around_points", "around_scheme", "extend",
             "refine", "seeds", "evals", "train"}
    if set(f) - known:
        fail(f"family {name}: unknown keys {', '.join(sorted(set(f) - known))}")
    tokens = f.get("tokens")
    if not isinstance(tokens, (int, float)) or tokens < 1:
        fail(f"family {name}: needs a positive token budget 'tokens'")
    shapes = {}
    for shape, s in dict(f.get("shapes", {})).items():
        s = {_key(k): v for k, v in dict(s).items()}
        if set(s) - SHAPE_KEYS or not {"layers", "hidden", "heads"} <= set(s):
            fail(f"family {name} shape {shape}: needs layers, hidden, heads (and optionally ffn)")
        if not all(isinstance(s[k], int) and s[k] > 0 for k in ("layers", "hidden", "heads")) \
                or s["hidden"] % s["heads"]:
            fail(f"family {name} shape {shape}: layers, hidden and heads must be positive integers, "
                 f"heads dividing hidden (got {s['layers']}, {s['hidden']}, {s['heads']})")
        shapes[str(shape)] = s
    if not shapes:
        fail(f"family {name}: no shapes")
    chosen = tuple(f.get("schemes", list(schemes)))
    for s in chosen:
        if s not in schemes:
            fail(f"family {name}: scheme {s!r} is not in [schemes]")
    lrs = tuple(float(x) for x in f.get("lrs", []))
    around = f.get("lrs_around")
    if bool(lrs) == bool(around):
        fail(f"family {name}: give exactly one of 'lrs' and 'lrs_around'")
    if any(not (x > 0 and math.isfinite(x)) for x in lrs):
        fail(f"family {name}: learning rates must be positive")
    points, source_scheme = int(f.get("around_points", 3)), f.get("around_scheme")
    if around is not None:
        if around not in earlier:
            fail(f"family {name}: lrs_around = {around!r} must name a family defined before it")
        if points not in (1, 3):
            fail(f"family {name}: around_points must be 1 or 3")
        needed = {source_scheme} if source_scheme else set(chosen)
        missing = needed - set(earlier[around].schemes)
        if missing:
            fail(f"family {name}: family {around} does not run {', '.join(sorted(missing))}")
    seeds = tuple(int(x) for x in f.get("seeds", [1]))
    if not seeds or len(set(seeds)) != len(seeds):
        fail(f"family {name}: 'seeds' must be a non-empty list of distinct integers")
    extend, evals = int(f.get("extend", 2)), int(f.get("evals", 8))
    if extend < 0 or evals < 1:
        fail(f"family {name}: extend must be >= 0 and evals >= 1")
    train = {_key(k): v for k, v in dict(f.get("train", {})).items()}
    if set(train) & RESERVED:
        fail(f"family {name}: train sets {', '.join(sorted(set(train) & RESERVED))}, which the study sets itself")
    refine = f.get("refine", False)
    if not isinstance(refine, bool):
        fail(f"family {name}: refine must be true or false")
    return Family(name, int(tokens), shapes, chosen, lrs, around, points, source_scheme, extend, refine, seeds,
                  evals, train)


# ---- planning ----------------------------------------------------------------------------------
def lr_step(lr: float, up: bool) -> float:
    """The next learning rate on the half-decade ladder 1, 3, 10, 30, ... (other values move by
    sqrt(10), rounded to one significant digit)."""
    mantissa, exponent = (float(x) for x in f"{lr:.0e}".split("e"))
    if mantissa == 1.0:
        return float(f"3e{int(exponent)}") if up else float(f"3e{int(exponent) - 1}")
    if mantissa == 3.0:
        return float(f"1e{int(exponent) + 1}") if up else float(f"1e{int(exponent)}")
    return float(f"{lr * 10 ** (0.5 if up else -0.5):.0e}")


def run_loss(record: dict | None) -> float:
    """The quantity a study minimises: the final valid MLM loss; inf for a run that diverged or
    failed (so it never wins), None while the run is not finished."""
    if record is None:
        return None
    value = record.get("valid_mlm_loss")
    return float(value) if record.get("status") == "done" and value is not None and math.isfinite(value) \
        else math.inf


# a run that ends less than this far under the unigram reference loss never left the token-frequency
# plateau: it stalled
STALL_MARGIN = 0.1


def stall_line(unigram: float | None) -> float | None:
    """The final valid loss a run must end below to count as trained (None: unknown)."""
    return None if unigram is None else unigram - STALL_MARGIN


def cell_search(spec: Spec, fam: Family, shape: str, scheme: str, records: dict,
                stall_line: float | None = None) -> tuple[list[float], float | None]:
    """The learning rates a cell's search needs now, and its best learning rate once the search is
    complete (None before). ``records`` maps run ids to finished-run records. With ``fam.refine``
    and a ``stall_line`` (the loss a run must end below to count as trained), a cell whose best run
    of the sweep stalled also runs the half steps between its learning rates (:func:`half_steps`)."""
    lrs, best = _sweep(spec, fam, shape, scheme, records, stall_line)
    if best is None or not fam.refine or stall_line is None:
        return lrs, best
    loss = lambda lr: run_loss(records.get(Run(fam.name, shape, scheme, lr, fam.search_seed).id))  # noqa: E731
    if not (math.isfinite(loss(best)) and loss(best) > stall_line):
        return lrs, best
    lrs = sorted(set(lrs) | set(half_steps(lrs)))
    losses = [loss(lr) for lr in lrs]
    if any(x is None for x in losses):
        return lrs, None
    return lrs, lrs[min(range(len(lrs)), key=lambda i: losses[i])]


def half_steps(lrs: list[float]) -> list[float]:
    """The geometric midpoint of each adjacent pair of a sorted grid, at two significant digits
    (1e-4, 3e-4, 1e-3 -> 1.7e-4, 5.5e-4)."""
    return [float(f"{math.sqrt(a * b):.2g}") for a, b in zip(lrs, lrs[1:])]


def _sweep(spec: Spec, fam: Family, shape: str, scheme: str, records: dict,
           stall_line: float | None) -> tuple[list[float], float | None]:
    """The grid search with its extension past an edge where the best lr sits (``fam.extend``)."""
    if fam.lrs_around is not None:
        source = spec.families[fam.lrs_around]
        layers = fam.shapes[shape]["layers"]
        src_shape = min(source.shapes, key=lambda k: abs(math.log(source.shapes[k]["layers"] / layers)))
        centre = cell_search(spec, source, src_shape, fam.around_scheme or scheme, records, stall_line)[1]
        if centre is None:
            return [], None
        grid = [centre] if fam.around_points == 1 else [lr_step(centre, False), centre, lr_step(centre, True)]
    else:
        grid = list(fam.lrs)
    lrs = sorted(set(grid))
    while True:
        losses = [run_loss(records.get(Run(fam.name, shape, scheme, lr, fam.search_seed).id)) for lr in lrs]
        if any(x is None for x in losses):
            return lrs, None
        best = lrs[min(range(len(lrs)), key=lambda i: losses[i])]
        above = sum(lr > max(grid) for lr in lrs)
        below = sum(lr < min(grid) for lr in lrs)
        if all(math.isinf(x) for x in losses):
            return lrs, best   # nothing trained: no edge to follow
        if best == lrs[-1] and above < fam.extend:
            lrs.append(lr_step(best, True))
        elif best == lrs[0] and below < fam.extend:
            lrs.insert(0, lr_step(best, False))
        else:
            return lrs, best


def plan(spec: Spec, records: dict, stall_line: float | None = None) -> list[Run]:
    """Every run the study still needs that can start now, in spec order (``stall_line``: see
    :func:`cell_search`)."""
    todo = []
    for fam in spec.families.values():
        for shape in fam.shapes:
            for scheme in fam.schemes:
                lrs, best = cell_search(spec, fam, shape, scheme, records, stall_line)
                runs = [Run(fam.name, shape, scheme, lr, fam.search_seed) for lr in lrs]
                if best is not None:
                    runs += [Run(fam.name, shape, scheme, best, seed) for seed in fam.seeds[1:]]
                todo += [r for r in runs if r.id not in records]
    return todo


def non_embedding_params(shape: dict) -> int:
    """Parameters of the transformer layers (weights, biases, LayerNorms): 4 d^2 + 2 d d_f + 9 d + d_f
    per layer."""
    d = shape["hidden"]
    d_f = shape.get("ffn") or 4 * d
    return shape["layers"] * (4 * d * d + 2 * d * d_f + 9 * d + d_f)


def steps_of(spec: Spec, fam: Family) -> int:
    return max(1, round(fam.tokens / (spec.train["global_batch"] * spec.train["seq_len"])))


def pretrain_flags(spec: Spec, run: Run, device: str) -> dict:
    """The ``dslm pretrain`` settings of ``run`` (without paths): shared, per-device, scheme, shape,
    learning rate, seed, steps and the evaluation / checkpoint cadence."""
    fam = spec.families[run.family]
    steps = steps_of(spec, fam)
    flags = {**spec.train, **(spec.train_cuda if device == "cuda" else spec.train_cpu),
             **fam.train, **spec.schemes[run.scheme], **fam.shapes[run.shape],
             "lr": run.lr, "seed": run.seed, "steps": steps,
             "eval_every": max(1, steps // fam.evals), "eval_iters": "all",
             "save_every": max(1, steps // 4), "keep_last": 1}
    return flags


def as_argv(flags: dict) -> list[str]:
    """``{"seq_len": 128, "cuda_graphs": True}`` -> ``["--seq-len", "128", "--cuda-graphs"]``."""
    argv = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        elif value is not None:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return argv
