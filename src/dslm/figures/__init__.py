"""Signal-propagation figures (THEORY.md section 4): build a BERT (or, with --arch gpt, a decoder)
with one init scheme, probe one forward/backward on a real-text batch in training mode, predict the
same curves from the component theory, and plot both.

For each LayerNorm placement (--placements, default pre and post; --init deepnorm is a Post-LN
scheme and draws Post-LN only) the command writes into --out:
preln_forward.png, preln_backward.png, postln_forward.png, postln_backward.png (measured curve with
the prediction overlaid), correlation.png (cross-token correlation, every placement drawn) and
signal_propagation.json (every per-layer number, the predictions and their agreement). Forward
variance and correlation are absolute predictions; the predicted gradient norms are relative and
are scaled by the one constant (the loss's gradient scale) that matches their geometric mean to the
measurement. --preset paper is THEORY.md's setting (192 layers, d 1024, 16 heads, L 256, batch 64,
fp32, dropout 0.1; dslm lam2/beta2 0.995/0.005); --preset small is a CPU-sized deep model. The
model flags are dslm pretrain's (dslm.model.flags, less --ln); a flag given wins over the preset.
--arch gpt builds the decoder (dslm.model.GPTLMHeadModel: causal attention, word + position
embeddings, tied LM head) from the same flags and probes its next-token loss on next-token windows
of the same data (dslm.data.NextTokenDataset); its default folder is outputs/figures/gpt/<init>.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from dslm.errors import UsageError
from dslm.figures.plots import ARCH_NAME, LN_NAME, replot, write_figures  # noqa: F401 (replot: public)
from dslm.files import write_text_atomic
from dslm.model.config import BertConfig, GPTConfig
from dslm.model.flags import add_model_arguments, config_from_args
from dslm.runtime import resolve_device

PRESETS = {
    # THEORY.md section 4
    "paper": dict(layers=192, hidden=1024, heads=16, seq_len=256, batch=64, micro_batch=8,
                  dropout=0.1, lam2=0.995, beta2=0.005),
    # deep and narrow enough for 2 CPU cores; d 256 keeps the per-layer weight noise small enough
    # for Post-LN's gradient growth to show (at d 128 it drowns in it); dslm beta^2 = 1/layers
    "small": dict(layers=96, hidden=256, heads=4, seq_len=128, batch=8, micro_batch=8,
                  dropout=0.1, lam2=None, beta2=None),
}
DSLM_KEYS = ("lam2", "beta2")   # the preset's residual scales: --init dslm only
PLACEMENTS = ("pre", "post")
POST_LN_ONLY = ("deepnorm",)
DEFAULT_DATA = Path("outputs") / "data" / "embedded"
ARCHS = ("bert", "gpt")


def add_arguments(p):
    """The command's flags: the run's own, then the model and batch flags a preset fills."""
    p.add_argument("--arch", choices=ARCHS, default="bert",
                   help="the model: bert (the encoder, masked-LM + binary loss) or gpt (the decoder, "
                        "next-token loss)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="defaults of the model and batch flags (default: paper on a GPU, small on a CPU)")
    p.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=argparse.SUPPRESS,
                   help="LayerNorm placements to run (default: pre post; with --init deepnorm: post, "
                        "the only placement DeepNorm is defined for)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default outputs/figures/<init>, with --arch gpt "
                        "outputs/figures/gpt/<init>)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (auto: cuda if available)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the model weights, the batch and dropout")
    p.add_argument("--data", default=None, metavar="DIR",
                   help=f"prepared dataset (default: the embedded corpus, prepared on first use in {DEFAULT_DATA})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("model and batch (a flag given wins over the preset)")
    add_model_arguments(g, defaults={"init": "xavier", "activation": "relu"}, exclude=("ln",))   # --placements instead
    g.add_argument("--dropout", type=float, help="hidden and attention dropout p")
    g.add_argument("--seq-len", type=int, help="sequence length L")
    g.add_argument("--batch", type=int, help="sequences in the batch")
    g.add_argument("--micro-batch", type=int, help="sequences per forward/backward")
    for action in g._group_actions:   # a preset's flag: absent unless given, filled by _resolve
        if action.dest in PRESETS["paper"]:
            shown = ", ".join(f"{name} {v[action.dest]}" for name, v in PRESETS.items()
                              if v[action.dest] is not None)
            action.help = f"{action.help}; preset {shown}"
            action.default = argparse.SUPPRESS


# ---------------------------------------------------------------------------------------------
# settings


def _resolve(args, device) -> dict:
    """Fill the flags not given from the preset (paper on a GPU, small on a CPU; its lam2/beta2
    with --init dslm only), check the flags figures alone has, and return the settings that
    signal_propagation.json records."""
    preset = args.preset or ("paper" if device.type == "cuda" else "small")
    values = PRESETS[preset]
    scales_given = any(hasattr(args, key) for key in DSLM_KEYS)
    if scales_given and args.init != "dslm":
        raise UsageError("--lam2/--beta2 apply to --init dslm only")
    scales = {key: getattr(args, key, None) if scales_given else values[key] for key in DSLM_KEYS}
    settings = {key: getattr(args, key, values[key]) for key in values if key not in DSLM_KEYS}
    settings.update(scales, preset=preset, r0=args.r0)
    for key, value in settings.items():
        setattr(args, key, value)
    if args.init != "dslm":
        args.lam2 = args.beta2 = None
    for key in ("batch", "micro_batch"):
        if settings[key] <= 0:
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {settings[key]}")
    if args.seq_len < 8:
        raise UsageError(f"--seq-len must be >= 8, got {args.seq_len}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    return settings


def _placements(args) -> list[str]:
    given = getattr(args, "placements", None)
    if given is None:
        return ["post"] if args.init in POST_LN_ONLY else list(PLACEMENTS)
    placements = list(dict.fromkeys(given))
    if args.init in POST_LN_ONLY and "pre" in placements:
        raise UsageError(f"--placements pre: --init {args.init} is a Post-LN scheme (use post)")
    return placements


def _config(args, ln: str, vocab_size: int, r0=None):
    """The model of one placement: the shared model flags (:mod:`dslm.model.flags`) with LayerNorm
    ``ln``, exactly --seq-len positions and, where given, a measured r0; a :class:`GPTConfig` with
    --arch gpt."""
    measured = {} if r0 is None else {"r0": r0}
    config_class = GPTConfig if args.arch == "gpt" else BertConfig
    return config_from_args(args, vocab_size, args.seq_len, config_class, ln=ln,
                            max_position_embeddings=args.seq_len, **measured)


def _batch(args):
    """(the batch, the vocabulary size, the data folder): BERT pretraining samples, or with --arch
    gpt next-token windows (:func:`dslm.figures.decoder.next_token_windows`), of --data or the
    embedded corpus."""
    from dslm.data import PretrainingDataset, ensure_embedded_dataset

    data_dir = args.data
    if data_dir is None:
        data_dir = ensure_embedded_dataset(DEFAULT_DATA)
    elif not Path(data_dir).is_dir():
        raise UsageError(f"--data {data_dir}: no such directory (expected a prepared dataset)")
    if args.arch == "gpt":
        from dslm.figures.decoder import next_token_windows

        return (*next_token_windows(data_dir, args.seq_len, args.batch, args.seed), Path(data_dir))
    ds = PretrainingDataset(data_dir, split="train", seq_len=args.seq_len, seed=args.seed)
    indices = [i % len(ds) for i in range(args.batch)]
    return ds.get_batch(indices), len(ds.vocab), Path(data_dir)


def _out(args) -> Path:
    """--out, or outputs/figures/<init> (BERT) and outputs/figures/gpt/<init> (the decoder)."""
    out = Path("outputs") / "figures" / args.init
    if args.arch == "gpt":
        out = Path("outputs") / "figures" / "gpt" / args.init
    out = Path(args.out) if args.out else out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    return out


# ---------------------------------------------------------------------------------------------
# one run: build, probe, predict


def _r0_config(args, ln: str, vocab_size: int, batch: dict):
    """With --init dslm --r0 auto, the r0 of the s_vo recursion measured on this batch with the
    model's own embedding tables (word + position, + token type in BERT) drawn at unit std: r0 is
    scale-free. None otherwise (the flag's number or the default)."""
    import torch

    from dslm.model.blocks import Embeddings
    from dslm.probe import measure_r0

    if args.init != "dslm" or args.r0 != "auto":
        return None
    torch.manual_seed(args.seed)
    emb = Embeddings(_config(args, ln, vocab_size))   # only the tables
    for table in emb.modules():
        if isinstance(table, torch.nn.Embedding):
            torch.nn.init.normal_(table.weight)
    return measure_r0(emb, batch)


def _timed(timer: dict, key: str, device, fn, *a, **kw):
    """``fn(*a, **kw)``, its wall time (the device synchronised) in ``timer[key]``."""
    import torch

    t0 = time.perf_counter()
    value = fn(*a, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    timer[key] = time.perf_counter() - t0
    return value


def _build(args, config, device):
    """The model of ``config`` (a BERT, or a decoder with --arch gpt), seeded, on ``device``."""
    import torch

    from dslm.model import BertForPreTraining, GPTLMHeadModel

    torch.manual_seed(args.seed)
    with torch.device(device):
        return (GPTLMHeadModel if args.arch == "gpt" else BertForPreTraining)(config)


def _probe(args, model, batch):
    """(r0 of the model's input embeddings, the probe's measurement) on ``batch``."""
    import torch

    from dslm.probe import measure_r0, probe_model

    r0_input = measure_r0(model, batch)            # the input correlation the predictor starts from
    torch.manual_seed(args.seed + 1)               # dropout masks
    return r0_input, probe_model(model, batch, micro_batch_size=args.micro_batch)


def _lengths(batch: dict) -> np.ndarray:
    """Real tokens per sequence: the attention mask's, or every position (next-token windows)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return np.full(batch["input_ids"].shape[0], batch["input_ids"].shape[1])
    return mask.sum(1).cpu().numpy()


def _run_one(args, ln, batch, vocab_size, device, timer):
    """Build, probe and predict one placement; its record in signal_propagation.json."""
    from dslm.theory import predict

    config = _config(args, ln, vocab_size, _r0_config(args, ln, vocab_size, batch))
    model = _timed(timer, "build_s", device, _build, args, config, device)
    r0_input, measured = _timed(timer, "probe_s", device, _probe, args, model, batch)
    del model
    lengths = _lengths(batch)
    pred = _timed(timer, "predict_s", device, predict, config, lengths=lengths, r0=r0_input)
    return {
        "init": args.init, "ln": ln, "config": config.to_dict(),
        "batch": {"sequences": int(len(lengths)), "seq_len": int(batch["input_ids"].shape[1]),
                  "real_tokens": int(lengths.sum()), "mean_length": float(lengths.mean())},
        "r0_input": r0_input,
        **_compared(measured, pred),
        "seconds": dict(timer),
    }


def _compared(measured, pred) -> dict:
    """The measured and predicted curves side by side (the predicted gradients on the measurement's
    scale), their agreement and a summary."""
    from dslm.theory import agreement, normalise

    scale = float(np.exp(np.mean(np.log(measured.grad_norm) - np.log(pred.grad_norm))))
    p_gvar = normalise(pred.grad_variance, measured.grad_variance)
    stats = {
        "forward_variance": agreement(pred.forward_variance, measured.forward_variance),
        "correlation": agreement(pred.correlation, measured.correlation),
        "grad_norm": agreement(pred.grad_norm * scale, measured.grad_norm, log=True),
        "grad_variance": agreement(p_gvar, measured.grad_variance, log=True),
        "grad_correlation": agreement(pred.grad_correlation, measured.grad_correlation),
    }
    return {
        **measured.layer_curves(),
        **pred.layer_curves("predicted_", grad_scale=scale),
        # the stream gradient's variance is matched to the measurement on its own
        "predicted_grad_variance": p_gvar.tolist(),
        "predicted_grad_norm_relative": pred.grad_norm.tolist(),
        "grad_norm_scale": scale,
        "embedding_variance": measured.embedding_variance,
        "predicted_embedding_variance": pred.embedding_variance,
        "loss": measured.loss,
        "agreement": stats,
        "summary": _summary(measured),
    }


def _summary(measured) -> dict:
    """First / middle / last layer and range of the measured forward variance and gradient norm."""
    fv, g = measured.forward_variance, measured.grad_norm
    picks = (0, len(g) // 2 - 1, len(g) - 1)
    return {
        "forward_variance_first_mid_last": [float(fv[i]) for i in picks],
        "forward_variance_range": [float(fv.min()), float(fv.max())],
        "grad_norm_first_mid_last": [float(g[i]) for i in picks],
        "grad_norm_max_over_min": float(g.max() / g.min()),
        "grad_norm_top_over_bottom": float(g[-1] / g[0]),
    }


def _summary_line(run) -> str:
    """One run in one printed line: forward variance, correlation and gradient norm, and agreement."""
    a, s = run["agreement"], run["summary"]
    fv = s["forward_variance_first_mid_last"]
    gn = s["grad_norm_first_mid_last"]
    return (f"{run['init']:>8} {LN_NAME[run['ln']]:<8} forward var {fv[0]:.3g} / {fv[1]:.3g} / {fv[2]:.3g} "
            f"(R^2 {a['forward_variance']['r2']:.3f}, max err {100 * a['forward_variance']['max_rel_error']:.1f} %), "
            f"corr R^2 {a['correlation']['r2']:.3f}; grad norm {gn[0]:.3g} / {gn[1]:.3g} / {gn[2]:.3g}, "
            f"max/min {s['grad_norm_max_over_min']:.2f} (log R^2 {a['grad_norm']['r2']:.3f}, "
            f"max err {100 * a['grad_norm']['max_rel_error']:.1f} %)")


def _record(args, settings: dict, device, data_dir: Path, runs: list, start: float) -> dict:
    """signal_propagation.json: the command's settings, the machine and every run's record."""
    import torch

    return {
        "command": "dslm figures", "arch": args.arch, "init": args.init, "preset": args.preset,
        "settings": settings, "seed": args.seed, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "data": str(data_dir),
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                            if device.type == "cuda" else None),
        "runs": runs,
        "total_seconds": time.perf_counter() - start,
        "notes": ("forward_variance and correlation are absolute predictions from the component "
                  "formulas; predicted_grad_norm is the relative prediction times grad_norm_scale, "
                  "the one constant (the loss's gradient scale, outside the theory) that matches "
                  "the geometric means. R^2 of gradient curves is computed on log values."),
    }


def run(args) -> int:
    """Every placement of one init scheme: probe, predict, plot, and write signal_propagation.json."""
    import torch
    from tqdm import tqdm

    start = time.perf_counter()
    device = resolve_device(args.device)
    settings = _resolve(args, device)
    placements = _placements(args)
    for ln in placements:   # fail on impossible settings before any work (the vocabulary comes later)
        _config(args, ln, vocab_size=30522)
    out = _out(args)
    torch.manual_seed(args.seed)
    batch, vocab_size, data_dir = _batch(args)

    print(f"dslm figures: {ARCH_NAME[args.arch]}init {args.init}, preset {args.preset} "
          f"({args.layers} layers, d {args.hidden}, {args.heads} heads, L {args.seq_len}, batch {args.batch}, dropout {args.dropout}), "
          f"device {device}, seed {args.seed}", flush=True)
    runs = []
    bar = tqdm(placements, desc="figures", unit="run", disable=args.quiet)
    for ln in bar:
        bar.set_postfix_str(f"{args.init} {LN_NAME[ln]}")
        timer = {}
        runs.append(_run_one(args, ln, batch, vocab_size, device, timer))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()

    out.mkdir(parents=True, exist_ok=True)
    written = write_figures(runs, out, args.arch)
    record = _record(args, settings, device, data_dir, runs, start)
    json_path = out / "signal_propagation.json"
    write_text_atomic(json_path, json.dumps(record, indent=1) + "\n")
    for run_ in runs:
        print(_summary_line(run_))
    print(f"wrote {', '.join(p.name for p in written + [json_path])} to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    if any(not math.isfinite(v) for r in runs for v in r["forward_variance"]):
        print("warning: non-finite measurements (overflow?)")
    return 0
