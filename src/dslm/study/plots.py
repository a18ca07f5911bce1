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
    fams = list(spec.families.values())
    cells, unigram = result["cells"], result["unigram_valid_loss"]

    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.8), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for scheme in fam.schemes:
            pts = sorted((c["layers"], c["mean"], c["std"]) for c in cells
                         if c["family"] == fam.name and c["scheme"] == scheme and _finite(c["mean"]))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[p[2] if _finite(p[2]) else 0 for p in pts], marker="o", capsize=3, label=scheme)
        _reference(ax, unigram)
        ax.set_xscale("log")
        ax.set_xlabel("layers (equal non-embedding parameters)")
        ax.set_ylabel("final valid MLM loss (nats)")
        ax.set_title(f"family {fam.name}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "loss_vs_depth.png")

    ncol = max(len(f.shapes) for f in fams)
    fig, axes = plt.subplots(len(fams), ncol, figsize=(4 * ncol, 3.2 * len(fams)), squeeze=False)
    for row, fam in zip(axes, fams):
        for ax, shape in zip(row, fam.shapes):
            for scheme in fam.schemes:
                c = next(c for c in cells if (c["family"], c["shape"], c["scheme"]) == (fam.name, shape, scheme))
                pts = sorted((float(lr), v) for lr, v in c["lr_sweep"].items() if _finite(v))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=scheme)
            _reference(ax, unigram)
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_title(f"{fam.name} {shape}", fontsize=10)
        row[0].set_ylabel("final valid MLM loss")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "loss_vs_lr.png")

    runs = result["runs"]
    tokens_per_step = spec.train["global_batch"] * spec.train["seq_len"]
    fig, axes = plt.subplots(len(fams), ncol, figsize=(4 * ncol, 3.2 * len(fams)), squeeze=False)
    for row, fam in zip(axes, fams):
        for ax, shape in zip(row, fam.shapes):
            for k, scheme in enumerate(fam.schemes):
                c = next(c for c in cells if (c["family"], c["shape"], c["scheme"]) == (fam.name, shape, scheme))
                for r in runs:
                    if (r["family"], r["shape"], r["scheme"], r["lr"]) == (fam.name, shape, scheme, c["best_lr"]):
                        pts = [(s * tokens_per_step / 1e6, v) for s, _, v, _ in r["curve_valid"] if _finite(v)]
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{k}", lw=1,
                                label=scheme if r["seed"] == fam.search_seed else None)
            _reference(ax, unigram)
            ax.set_xlabel("tokens (M)")
            ax.set_title(f"{fam.name} {shape}", fontsize=10)
        row[0].set_ylabel("valid MLM loss")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "curves.png")

    profiled = [r for r in runs if r.get("grad_profile")]
    if profiled:
        plot_grad_profiles(profiled, out / "grad_profiles.png")


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
