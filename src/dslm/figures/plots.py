"""The plots of `dslm figures`: per placement the forward variance and the gradient norms, measured
and predicted, and the correlation of all placements together; :func:`replot` redraws them from a
folder's signal_propagation.json."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

LN_NAME = {"pre": "Pre-LN", "post": "Post-LN"}
ARCH_NAME = {"bert": "", "gpt": "GPT "}   # the prefix of a plot title


def _plot_curve(run, key, ylabel, title, path, log=False):
    """One per-layer curve of ``run``, measured (dots) and predicted (line), and their agreement."""
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


def _plot_correlation(runs, path, arch: str):
    """The cross-token correlation of every run (placement), measured and predicted."""
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
    ax.set_title(f"{ARCH_NAME[arch]}{runs[0]['init']}: correlation", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def _describe(run, arch: str) -> str:
    """The plot title: the model (a decoder says so), its size, the batch and the residual scales."""
    from dslm.model import BertConfig, GPTConfig

    c = run["config"]
    text = (f"{ARCH_NAME[arch]}{run['init']} {LN_NAME[run['ln']]}, {c['num_layers']} layers, "
            f"d {c['hidden_size']}, L {run['batch']['seq_len']}, batch {run['batch']['sequences']}")
    config_class = GPTConfig if arch == "gpt" else BertConfig
    lam2, beta2 = config_class.from_dict(c).residual_variances()
    if run["init"] == "deepnorm":
        text += f", $\\alpha$ {math.sqrt(lam2):.4g}"
    elif (lam2, beta2) != (1.0, 1.0):
        text += f", $\\lambda^2$/$\\beta^2$ {lam2:.4g}/{beta2:.4g}"
    return text


def write_figures(runs, out: Path, arch: str = "bert") -> list[Path]:
    """The PNGs of ``runs`` (the records of signal_propagation.json) into ``out``: per placement the
    forward variance and the gradient norms, and the correlation of every placement in one plot."""
    written = []
    for run in runs:
        tag = "preln" if run["ln"] == "pre" else "postln"
        desc = _describe(run, arch)
        path = out / f"{tag}_forward.png"
        _plot_curve(run, "forward_variance", "variance of the residual stream", desc, path)
        written.append(path)
        path = out / f"{tag}_backward.png"
        _plot_curve(run, "grad_norm", "gradient norm of the layer's weights", desc, path, log=True)
        written.append(path)
    path = out / "correlation.png"
    _plot_correlation(runs, path, arch)
    written.append(path)
    return written


def replot(folder) -> list[Path]:
    """Redraw the PNGs of ``folder`` from its signal_propagation.json (no model, no device); a record
    without ``arch`` is a BERT's."""
    folder = Path(folder)
    record = json.loads((folder / "signal_propagation.json").read_text())
    return write_figures(record["runs"], folder, record.get("arch", "bert"))
