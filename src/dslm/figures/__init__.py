"""Signal-propagation figures (THEORY.md section 4): build a BERT with one init scheme, probe one
forward/backward on a real-text batch in training mode, predict the same curves from the component
theory, and plot both.

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
from dslm.files import write_text_atomic
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
LN_NAME = {"pre": "Pre-LN", "post": "Post-LN"}


def add_arguments(p):
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="defaults of the model and batch flags (default: paper on a GPU, small on a CPU)")
    p.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=argparse.SUPPRESS,
                   help="LayerNorm placements to run (default: pre post; with --init deepnorm: post, "
                        "the only placement DeepNorm is defined for)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default outputs/figures/<init>)")
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
    ``ln``, exactly --seq-len positions and, where given, a measured r0."""
    measured = {} if r0 is None else {"r0": r0}
    return config_from_args(args, vocab_size, args.seq_len, ln=ln,
                            max_position_embeddings=args.seq_len, **measured)


def _batch(args):
    from dslm.data import PretrainingDataset, ensure_embedded_dataset

    data_dir = args.data
    if data_dir is None:
        data_dir = ensure_embedded_dataset(DEFAULT_DATA)
    elif not Path(data_dir).is_dir():
        raise UsageError(f"--data {data_dir}: no such directory (expected a prepared dataset)")
    ds = PretrainingDataset(data_dir, split="train", seq_len=args.seq_len, seed=args.seed)
    indices = [i % len(ds) for i in range(args.batch)]
    return ds.get_batch(indices), len(ds.vocab), Path(data_dir)


# ---------------------------------------------------------------------------------------------
# one run: build, probe, predict


def _run_one(args, ln, batch, vocab_size, device, timer):
    import torch

    from dslm.model import BertForPreTraining
    from dslm.model.bert import Embeddings
    from dslm.probe import measure_r0, probe_model
    from dslm.theory import agreement, normalise, predict

    init, seed = args.init, args.seed
    r0_config = None
    if init == "dslm" and args.r0 == "auto":   # the recursion's r0, measured on this batch
        torch.manual_seed(seed)
        emb = Embeddings(_config(args, ln, vocab_size))   # only the tables: r0 is scale-free
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            torch.nn.init.normal_(table.weight)
        r0_config = measure_r0(emb, batch)
    config = _config(args, ln, vocab_size, r0_config)

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        model = BertForPreTraining(config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    timer["build_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    r0_input = measure_r0(model, batch)            # the input correlation the predictor starts from
    torch.manual_seed(seed + 1)                    # dropout masks
    measured = probe_model(model, batch, micro_batch_size=args.micro_batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    timer["probe_s"] = time.perf_counter() - t0
    del model

    t0 = time.perf_counter()
    lengths = batch["attention_mask"].sum(1).cpu().numpy()
    pred = predict(config, lengths=lengths, r0=r0_input)
    timer["predict_s"] = time.perf_counter() - t0

    scale = float(np.exp(np.mean(np.log(measured.grad_norm) - np.log(pred.grad_norm))))
    p_norm = pred.grad_norm * scale
    p_gvar = normalise(pred.grad_variance, measured.grad_variance)
    stats = {
        "forward_variance": agreement(pred.forward_variance, measured.forward_variance),
        "correlation": agreement(pred.correlation, measured.correlation),
        "grad_norm": agreement(p_norm, measured.grad_norm, log=True),
        "grad_variance": agreement(p_gvar, measured.grad_variance, log=True),
        "grad_correlation": agreement(pred.grad_correlation, measured.grad_correlation),
    }
    g = measured.grad_norm
    return {
        "init": init, "ln": ln, "config": config.to_dict(),
        "batch": {"sequences": int(len(lengths)), "seq_len": int(batch["input_ids"].shape[1]),
                  "real_tokens": int(lengths.sum()), "mean_length": float(lengths.mean())},
        "r0_input": r0_input,
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
        "summary": {
            "forward_variance_first_mid_last": [float(measured.forward_variance[i])
                                                for i in (0, len(g) // 2 - 1, len(g) - 1)],
            "forward_variance_range": [float(measured.forward_variance.min()),
                                       float(measured.forward_variance.max())],
            "grad_norm_first_mid_last": [float(g[i]) for i in (0, len(g) // 2 - 1, len(g) - 1)],
            "grad_norm_max_over_min": float(g.max() / g.min()),
            "grad_norm_top_over_bottom": float(g[-1] / g[0]),
        },
        "seconds": dict(timer),
    }


# ---------------------------------------------------------------------------------------------
# figures


def _plot_curve(run, key, ylabel, title, path, log=False):
    from dslm.plotting import plt, save

    layers = np.arange(1, len(run[key]) + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(layers, run[key], "o", ms=3, color="C0", label="measured")
    ax.plot(layers, run["predicted_" + key], "-", lw=1.6, color="C3", label="theory")
    st = run["agreement"][key]
    values = np.concatenate([run[key], run["predicted_" + key]])
    lo, hi = float(values.min()), float(values.max())
    ratio = float(np.max(run[key]) / np.min(run[key]))
    flat = ratio < 1.5
    if log:
        ax.set_yscale("log")
        if flat:                      # a decade around the curve, so flat reads as flat
            ax.set_ylim(lo / 3, hi * 3)
    elif flat:
        ax.set_ylim(0, 2 * hi)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    if flat:   # R^2 of a flat curve measures sampling noise, not the prediction
        fit = f"flat (measured max/min {ratio:.2f}), R$^2$ not informative"
    else:
        fit = f"R$^2$ {st['r2']:.3f}{' (log)' if st['log'] else ''}"
    ax.set_title(f"{title}\n{fit}, max rel. error {100 * st['max_rel_error']:.1f} %", fontsize=10)
    ax.grid(alpha=0.3, which="both" if log else "major")
    ax.legend()
    save(fig, path)


def _plot_correlation(runs, path):
    from dslm.plotting import plt, save

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for j, run in enumerate(runs):
        layers = np.arange(1, len(run["correlation"]) + 1)
        name = LN_NAME[run["ln"]]
        ax.plot(layers, run["correlation"], "o", ms=3, color=f"C{2 * j}", label=f"{name} measured")
        ax.plot(layers, run["predicted_correlation"], "-", color=f"C{2 * j + 1}",
                label=f"{name} theory (R$^2$ {run['agreement']['correlation']['r2']:.2f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("cross-token correlation of the residual stream")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{runs[0]['init']}: correlation", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def _describe(run) -> str:
    c = run["config"]
    text = (f"{run['init']} {LN_NAME[run['ln']]}, {c['num_layers']} layers, d {c['hidden_size']}, "
            f"L {run['batch']['seq_len']}, batch {run['batch']['sequences']}")
    from dslm.model import BertConfig

    lam2, beta2 = BertConfig.from_dict(c).residual_variances()
    if run["init"] == "deepnorm":
        text += f", $\\alpha$ {math.sqrt(lam2):.4g}"
    elif (lam2, beta2) != (1.0, 1.0):
        text += f", $\\lambda^2$/$\\beta^2$ {lam2:.4g}/{beta2:.4g}"
    return text


def _write_figures(runs, out: Path) -> list[Path]:
    written = []
    for run in runs:
        tag = "preln" if run["ln"] == "pre" else "postln"
        desc = _describe(run)
        path = out / f"{tag}_forward.png"
        _plot_curve(run, "forward_variance", "variance of the residual stream", desc, path)
        written.append(path)
        path = out / f"{tag}_backward.png"
        _plot_curve(run, "grad_norm", "gradient norm of the layer's weights", desc, path, log=True)
        written.append(path)
    path = out / "correlation.png"
    _plot_correlation(runs, path)
    written.append(path)
    return written


def replot(folder) -> list[Path]:
    """Redraw the PNGs of ``folder`` from its signal_propagation.json (no model, no device)."""
    folder = Path(folder)
    record = json.loads((folder / "signal_propagation.json").read_text())
    return _write_figures(record["runs"], folder)


def _summary_line(run) -> str:
    a, s = run["agreement"], run["summary"]
    fv = s["forward_variance_first_mid_last"]
    gn = s["grad_norm_first_mid_last"]
    return (f"{run['init']:>8} {LN_NAME[run['ln']]:<8} forward var {fv[0]:.3g} / {fv[1]:.3g} / {fv[2]:.3g} "
            f"(R^2 {a['forward_variance']['r2']:.3f}, max err {100 * a['forward_variance']['max_rel_error']:.1f} %), "
            f"corr R^2 {a['correlation']['r2']:.3f}; grad norm {gn[0]:.3g} / {gn[1]:.3g} / {gn[2]:.3g}, "
            f"max/min {s['grad_norm_max_over_min']:.2f} (log R^2 {a['grad_norm']['r2']:.3f}, "
            f"max err {100 * a['grad_norm']['max_rel_error']:.1f} %)")


def run(args) -> int:
    import torch
    from tqdm import tqdm

    start = time.perf_counter()
    device = resolve_device(args.device)
    settings = _resolve(args, device)
    placements = _placements(args)
    for ln in placements:   # fail on impossible settings before any work (the vocabulary comes later)
        _config(args, ln, vocab_size=30522)
    out = Path(args.out) if args.out else Path("outputs") / "figures" / args.init
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    torch.manual_seed(args.seed)
    batch, vocab_size, data_dir = _batch(args)

    print(f"dslm figures: init {args.init}, preset {args.preset} ({args.layers} layers, d {args.hidden}, "
          f"{args.heads} heads, L {args.seq_len}, batch {args.batch}, dropout {args.dropout}), "
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
    written = _write_figures(runs, out)
    record = {
        "command": "dslm figures", "init": args.init, "preset": args.preset, "settings": settings,
        "seed": args.seed, "device": str(device),
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
    json_path = out / "signal_propagation.json"
    write_text_atomic(json_path, json.dumps(record, indent=1) + "\n")
    for run_ in runs:
        print(_summary_line(run_))
    print(f"wrote {', '.join(p.name for p in written + [json_path])} to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    if any(not math.isfinite(v) for r in runs for v in r["forward_variance"]):
        print("warning: non-finite measurements (overflow?)")
    return 0
