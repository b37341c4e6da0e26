"""PNG plots for `jaxprfaas simulate --plots` and the README (matplotlib, imported lazily here
only, so nothing else in the scheduler pays for it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxprfaas.scheduler import throughput_model as tm


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ttft_cdf(results: dict, path: Path, title: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        tt = np.sort(res.ttft[np.isfinite(res.ttft)])
        if tt.size:
            ax.plot(tt, np.arange(1, tt.size + 1) / tt.size, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "TTFT CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def lambda_vs_t(system: tm.System, dist, point: tm.OperatingPoint, baselines: dict, path: Path,
                step: float = 64.0, title: str = "") -> Path:
    """Fig. 5(b)-style: Theta_prfaas/p and Theta_pd-p/(1-p) vs t at the best split."""
    plt = _plt()
    grid = tm.threshold_grid(dist, step)
    grid = grid[(grid >= 1024) & (grid <= 0.9 * dist.hi)]
    c = tm.evaluate(system, dist, grid, point.n_p, "paper")
    fig, ax = plt.subplots(figsize=(6, 4))
    with np.errstate(divide="ignore", invalid="ignore"):
        ax.plot(grid / 1e3, c.theta_prfaas / c.p, label="Θ_prfaas / p")
        ax.plot(grid / 1e3, c.theta_pd_p / (1 - c.p), label="Θ_pd-p / (1-p)")
    ax.plot(grid / 1e3, c.lambda_max, "k", lw=2, label=f"Λ_max (N_p={point.n_p}, N_d={point.n_d})")
    ax.axvline(point.threshold / 1e3, color="gray", ls=":", label=f"t* = {point.threshold / 1e3:.1f}K")
    for name, b in baselines.items():
        ax.axhline(b.lambda_max, ls="--", lw=1, color="C3" if "homo" in name else "C4", label=f"{name}: {b.lambda_max:.2f}")
    ax.set_ylim(0, 2.0 * point.lambda_max)
    ax.set_xlabel("threshold t (K tokens)")
    ax.set_ylabel("req/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Λ_max vs threshold (Eq. 6, 7)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def link_timeline(results: dict, path: Path, title: str = "", smooth_s: float = 10.0,
                  shade: list | None = None) -> Path:
    """Link utilisation over time (`smooth_s` moving average) and the threshold in force;
    `shade` is a list of (start, end) intervals to mark (bursts)."""
    plt = _plt()
    with_link = {n: r for n, r in results.items() if r.link_util}
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for name, r in with_link.items():
        u = np.asarray(r.link_util)
        k = max(int(smooth_s / r.meter_dt), 1)
        sm = np.convolve(u, np.ones(k) / k, mode="same")
        axes[0].plot(np.arange(u.size) * r.meter_dt, sm, label=name)
        tl = np.asarray(r.threshold_log + [(u.size * r.meter_dt, r.threshold_log[-1][1])])
        axes[1].step(tl[:, 0], tl[:, 1] / 1e3, where="post", label=name)
    for a, b in shade or ():
        for ax in axes:
            ax.axvspan(a, b, color="0.85", zorder=0)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel(f"link utilisation ({smooth_s:g} s avg)")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].set_ylabel("threshold t (K tokens)")
    axes[1].set_xlabel("time (s)")
    axes[1].grid(alpha=0.3)
    axes[0].set_title(title or "cross-datacenter link")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
