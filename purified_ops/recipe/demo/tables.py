"""The demo's statistics, tables and plots: arms compared over seeds, the grating goal's verdict."""
from __future__ import annotations

import math

import numpy as np

from .arms import ARMS, ORACLE_ARMS

__all__ = ["compare", "format_table", "plot", "grating_verdict", "POOL_MARK", "GRATING_GOAL"]


def _std(v):
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def compare(baseline, purified) -> dict:
    """Purified minus baseline: mean difference, its standard error (unpaired and paired)."""
    b, p = np.asarray(baseline, float), np.asarray(purified, float)
    n = len(b)
    diff = float(p.mean() - b.mean())
    se = math.sqrt(_std(b) ** 2 / n + _std(p) ** 2 / n) if n > 1 else float("nan")
    se_paired = _std(p - b) / math.sqrt(n) if n > 1 else float("nan")
    return {"diff": diff, "se": se, "se_paired": se_paired,
            "beats_by_2se": bool(n > 1 and diff > 2 * se),
            "beats_by_2se_paired": bool(n > 1 and diff > 2 * se_paired)}


POOL_MARK = "*"     # after an arm's name in the tables: its nuisance branch learned from the pool too


def format_table(results: dict, sizes, arms=ARMS, comparisons=(("purified", "plain"),), marked=()) -> str:
    """One block per regime: each arm's mean +- std, then each ``(arm, baseline)`` difference.
    The ``marked`` arms' names carry :data:`POOL_MARK`."""
    def name(a):
        return a + POOL_MARK if a in marked else a

    lines = []
    for regime, by_size in results.items():
        lines.append(f"regime: {regime}  (test accuracy, mean +- std over seeds)")
        header = (f"{'n_train':>8} " + " ".join(f"{name(a):>17}" for a in arms)
                  + "".join(f" {name(a) + '-' + name(b):>22}" for a, b in comparisons))
        lines.append(header)
        for n in sizes:
            row = by_size[n]
            cells = " ".join(f"{np.mean(row[a]):>9.4f} +- {_std(row[a]):.4f}" for a in arms)
            diffs = "".join(f" {c['diff']:>+10.4f} (SE {c['se']:.4f})"
                            for c in (compare(row[b], row[a]) for a, b in comparisons))
            lines.append(f"{n:>8} {cells}{diffs}")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, sizes, path: str, *, default_size=None, arms=ARMS, nuisance: str = "texture") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), squeeze=False)
    for ax, (regime, by_size) in zip(axes[0], results.items()):
        for arm, marker in zip(arms, "osD^vx"):
            means = np.array([np.mean(by_size[n][arm]) for n in sizes])
            stds = np.array([_std(by_size[n][arm]) for n in sizes])
            oracle = arm in ORACLE_ARMS          # reference rows: they know the true nuisance
            ax.plot(sizes, means, marker=marker, ls="--" if oracle else "-",
                    label=arm.removeprefix("oracle_").replace("_", " ") + (" (oracle)" if oracle else ""))
            ax.fill_between(sizes, means - stds, means + stds, alpha=0.15)
        if default_size in sizes:
            ax.axvline(default_size, color="grey", lw=0.8, ls=":")
        if len(sizes) > 1:
            ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.minorticks_off()
        ax.set_xticklabels([str(n) for n in sizes])
        ax.set_xlabel("training-set size")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"digits + {nuisance} nuisance: {regime}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


GRATING_GOAL = 0.10     # the per-sample arm's target margin over plain at the default size


def grating_verdict(row: dict) -> dict:
    """The per-sample arm against plain (by >= GRATING_GOAL and > 2 SE) and against the shared arm."""
    vs_plain, vs_shared = compare(row["plain"], row["per_sample"]), compare(row["shared"], row["per_sample"])
    return {"vs_plain": vs_plain, "vs_shared": vs_shared,
            "goal_met": bool(vs_plain["diff"] >= GRATING_GOAL and vs_plain["beats_by_2se"]
                             and vs_shared["beats_by_2se"])}
