"""The study's pictures (matplotlib, headless): final loss against depth at equal parameters, loss
against learning rate per cell, valid-loss curves at each cell's best learning rate, and, for runs
with a gradient profile, each layer's gradient norm at init and after training."""
from __future__ import annotations

import math
from pathlib import Path

from dslm.plotting import plt, save
from dslm.study.spec import Spec


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _reference(ax, unigram):
    if _finite(unigram):
        ax.axhline(unigram, color="0.5", ls="--", lw=1, label="unigram")


def plot_study(spec: Spec, result: dict, out: Path) -> None:
    """The study's plots in ``out``: loss vs depth per family, loss vs lr per cell, the training
    curves at each cell's best lr, and the gradient profiles of the runs that recorded them."""
    _plot_loss_vs_depth(spec, result, out / "loss_vs_depth.png")
    _plot_per_cell(spec, result, out / "loss_vs_lr.png", _lr_sweep, "learning rate", "final valid MLM loss")
    _plot_per_cell(spec, result, out / "curves.png", _best_lr_curves, "tokens (M)", "valid MLM loss")
    profiled = [r for r in result["runs"] if r.get("grad_profile")]
    if profiled:
        plot_grad_profiles(profiled, out / "grad_profiles.png")


def _plot_loss_vs_depth(spec: Spec, result: dict, path: Path) -> None:
    fams = list(spec.families.values())
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.8), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for scheme in fam.schemes:
            pts = sorted((c["layers"], c["mean"], c["std"]) for c in result["cells"]
                         if c["family"] == fam.name and c["scheme"] == scheme and _finite(c["mean"]))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[p[2] if _finite(p[2]) else 0 for p in pts], marker="o", capsize=3, label=scheme)
        _reference(ax, result["unigram_valid_loss"])
        ax.set_xscale("log")
        ax.set_xlabel("layers (equal non-embedding parameters)")
        ax.set_ylabel("final valid MLM loss (nats)")
        ax.set_title(f"family {fam.name}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def _plot_per_cell(spec: Spec, result: dict, path: Path, draw, xlabel: str, ylabel: str) -> None:
    """One panel per (family, shape); ``draw(ax, spec, result, fam, shape, scheme, colour)`` adds one
    scheme's lines."""
    fams = list(spec.families.values())
    ncol = max(len(f.shapes) for f in fams)
    fig, axes = plt.subplots(len(fams), ncol, figsize=(4 * ncol, 3.2 * len(fams)), squeeze=False)
    for row, fam in zip(axes, fams):
        for ax, shape in zip(row, fam.shapes):
            for k, scheme in enumerate(fam.schemes):
                draw(ax, spec, result, fam, shape, scheme, f"C{k}")
            _reference(ax, result["unigram_valid_loss"])
            ax.set_xlabel(xlabel)
            ax.set_title(f"{fam.name} {shape}", fontsize=10)
        row[0].set_ylabel(ylabel)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def _find_cell(result: dict, fam, shape: str, scheme: str) -> dict:
    return next(c for c in result["cells"] if (c["family"], c["shape"], c["scheme"]) == (fam.name, shape, scheme))


def _lr_sweep(ax, spec, result, fam, shape, scheme, colour) -> None:
    c = _find_cell(result, fam, shape, scheme)
    pts = sorted((float(lr), v) for lr, v in c["lr_sweep"].items() if _finite(v))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour, label=scheme)
    ax.set_xscale("log")


def _best_lr_curves(ax, spec, result, fam, shape, scheme, colour) -> None:
    c = _find_cell(result, fam, shape, scheme)
    tokens_per_step = spec.train["global_batch"] * spec.train["seq_len"]
    for r in result["runs"]:
        if (r["family"], r["shape"], r["scheme"], r["lr"]) == (fam.name, shape, scheme, c["best_lr"]):
            pts = [(s * tokens_per_step / 1e6, v) for s, _, v, _ in r["curve_valid"] if _finite(v)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour, lw=1,
                    label=scheme if r["seed"] == fam.search_seed else None)


def plot_grad_profiles(runs: list[dict], path: Path) -> None:
    """One panel per shape: the gradient norm of every layer (all six weight matrices together) at
    init (dashed) and after training (solid), one colour per scheme, log scale."""
    shapes = sorted({r["shape"] for r in runs}, key=lambda s: next(r["layers"] for r in runs if r["shape"] == s))
    schemes = sorted({r["scheme"] for r in runs})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for r in (r for r in runs if r["shape"] == shape):
            k = schemes.index(r["scheme"])
            for when, style in (("init", "--"), ("final", "-")):
                norms = r["grad_profile"].get(when, {}).get("grad_norm")
                if norms:
                    ax.plot(range(1, len(norms) + 1), norms, style, color=f"C{k}", lw=1,
                            label=f"{r['scheme']} {when}")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(f"{runs[0]['family']} {shape}" if len({r['family'] for r in runs}) == 1 else shape, fontsize=10)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("gradient norm (weights of the layer)")
    fig.tight_layout()
    save(fig, path)
