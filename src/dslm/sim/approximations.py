"""``dslm approximations``: the exact ReLU and FFN correlation maps against the paper's polynomial
approximations (THEORY.md section 1): r_relu ~ 0.7 r + 0.3 r^2 and
r_ffn ~ 1/pi + r/2 + (1/2 - 1/pi) r^2. Writes one PNG per map and prints the largest error."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dslm import theory
from dslm.files import write_json_atomic

MAPS = {
    "relu_correlation": ("ReLU output correlation", theory.relu_corr, theory.relu_corr_approx,
                         "0.7 r + 0.3 r^2"),
    "ffn_correlation": ("FFN output correlation", theory.ffn_corr, theory.ffn_corr_approx,
                        "1/pi + r/2 + (1/2 - 1/pi) r^2"),
}


def add_arguments(p):
    p.add_argument("--out", default="outputs/approximations", help="folder for the PNGs and approximations.json")
    p.add_argument("--points", type=int, default=401, help="number of input correlations in [-1, 1]")


def compare(points: int = 401) -> dict:
    """Largest absolute error of each approximation over r in [-1, 1] and over [0, 1]."""
    r = np.linspace(-1.0, 1.0, points)
    out = {}
    for key, (_, exact, approx, _) in MAPS.items():
        err = np.abs(approx(r) - exact(r))
        pos = r >= 0
        out[key] = {"max_abs_error": float(err.max()), "at_r": float(r[err.argmax()]),
                    "max_abs_error_r_ge_0": float(err[pos].max()), "at_r_ge_0": float(r[pos][err[pos].argmax()])}
    return out


def run(args) -> int:
    from dslm.errors import ConfigError
    from dslm.plotting import plt, save

    if args.points < 3:
        raise ConfigError("{points} must be >= 3")
    out = Path(args.out)
    r = np.linspace(-1.0, 1.0, args.points)
    summary = compare(args.points)
    for key, (title, exact, approx, formula) in MAPS.items():
        fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"wspace": 0.3})
        ax.plot(r, exact(r), label="exact", lw=2)
        ax.plot(r, approx(r), "--", label=f"approx: {formula}")
        ax.plot(r, r, ":", color="grey", label="identity")
        ax.set(xlabel="input correlation r", ylabel="output correlation", title=title)
        ax.legend()
        ax_err.plot(r, approx(r) - exact(r))
        ax_err.axhline(0, color="grey", lw=0.5)
        ax_err.set(xlabel="input correlation r", ylabel="approx - exact", title="approximation error")
        path = save(fig, out / f"{key}.png")
        s = summary[key]
        print(f"{title}: max |approx - exact| = {s['max_abs_error']:.4f} at r = {s['at_r']:.3f} "
              f"(r >= 0: {s['max_abs_error_r_ge_0']:.4f} at r = {s['at_r_ge_0']:.3f}) -> {path}")
    write_json_atomic(out / "approximations.json", summary)
    return 0
