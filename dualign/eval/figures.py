"""The paper's dual figures: the reference's safety scores, D(λ) for several margins, solver convergence."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runio import atomic_path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    _pyplot().close(fig)
    return Path(path)


def plot_safety_histogram(safety: np.ndarray, names, path, sign_means_unsafe: bool = True) -> Path:
    """Histogram of each safety score over all reference samples (safety (N, K, m)); with
    `sign_means_unsafe`, the unsafe side (< 0) is marked."""
    plt = _pyplot()
    m = safety.shape[2]
    fig, axes = plt.subplots(1, m, figsize=(4.5 * m, 3.2), squeeze=False)
    for j, ax in enumerate(axes[0]):
        v = safety[:, :, j].ravel()
        ax.hist(v, bins=40, color="#4C72B0", alpha=0.85)
        ax.axvline(v.mean(), color="k", lw=1, label=f"mean {v.mean():.3g}")
        if sign_means_unsafe:
            ax.axvline(0, color="#C44E52", lw=1, ls="--", label=f"unsafe (<0): {np.mean(v < 0):.0%}")
        ax.set_xlabel(names[j])
        ax.set_ylabel("reference samples")
        ax.legend(fontsize=8)
    fig.suptitle("Safety scores of the reference policy")
    return _save(fig, path)


def plot_dual_curves(reward, safety, beta, margins_grid, lam_star, names, path) -> Path:
    """D(λ) − min D along each constraint's axis (others at λ*), for several margins."""
    from ..dual import DualProblem

    plt = _pyplot()
    m = safety.shape[2]
    lam_star = np.asarray(lam_star, dtype=float)
    top = max(3.0 * lam_star.max(), 1.0)
    grid = np.linspace(0.0, top, 80)
    fig, axes = plt.subplots(1, m, figsize=(4.5 * m, 3.2), squeeze=False)
    for j, ax in enumerate(axes[0]):
        for b in margins_grid:
            margins = np.array(lam_star * 0 + b) if np.ndim(b) == 0 else np.asarray(b)
            problem = DualProblem(reward, safety, beta, margins)
            vals = []
            for x in grid:
                lam = lam_star.copy()
                lam[j] = x
                vals.append(problem.value(lam))
            vals = np.array(vals)
            i = int(np.argmin(vals))
            line, = ax.plot(grid, vals - vals.min(), lw=1.4, label=f"margin {np.atleast_1d(margins)[j]:.3g}")
            ax.plot(grid[i], 0, "o", color=line.get_color(), ms=4)
        ax.set_xlabel(f"λ[{names[j]}]")
        ax.set_ylabel("D(λ) − min D")
        ax.legend(fontsize=8)
    fig.suptitle(f"Dual function (β = {beta:g}); dots mark the minimizers")
    return _save(fig, path)


def plot_convergence(history, lam_star, path, baseline_history=None, baseline_label="PGD") -> Path:
    """|λ_t − λ*|_∞ per iteration (log scale), optionally against a baseline's trajectory."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    lam_star = np.asarray(lam_star, dtype=float)
    for hist, label in ((history, "projected Newton (dualign)"), (baseline_history, baseline_label)):
        if hist is None:
            continue
        err = [float(np.max(np.abs(np.atleast_1d(h) - lam_star))) for h in hist]
        err = np.maximum(err, 1e-17)
        ax.semilogy(range(len(err)), err, marker="o", ms=3, lw=1.2, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("|λ_t − λ*|∞")
    ax.legend(fontsize=8)
    ax.set_title("Dual solver convergence")
    return _save(fig, path)


def plot_before_after(reference, trained, columns, path) -> Path:
    """Distribution of each score for the reference and the trained model (held-out prompts)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.2), squeeze=False)
    for ax, col in zip(axes[0], columns):
        a, b = reference[col].to_numpy(), trained[col].to_numpy()
        bins = np.linspace(min(a.min(), b.min()), max(a.max(), b.max()), 30)
        ax.hist(a, bins=bins, alpha=0.55, label=f"reference (mean {a.mean():.3g})", color="#8C8C8C")
        ax.hist(b, bins=bins, alpha=0.55, label=f"trained (mean {b.mean():.3g})", color="#4C72B0")
        if col.startswith("safety") or "/safety/" in col:
            ax.axvline(0, color="#C44E52", lw=1, ls="--")
        ax.set_xlabel(col)
        ax.legend(fontsize=8)
    fig.suptitle("Held-out prompts: reference vs trained")
    return _save(fig, path)
