"""PNG charts for evaluation reports (matplotlib, Agg backend: no display needed)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_scores(report: dict, path: str, title: str = "") -> None:
    """Bar chart of VL (typed) vs VA (spoken) score per task, plus the overall score."""
    groups = [("all", report)] + sorted(report["by_task"].items())
    groups += sorted(report.get("by_source", {}).items())
    labels = [name for name, _ in groups]
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups)), 3.8))
    for offset, key, label in ((-width / 2, "vl_score", "VL (typed)"), (width / 2, "va_score", "VA (spoken)")):
        values = [g.get(key) or 0.0 for _, g in groups]
        bars = ax.bar([i + offset for i in range(len(groups))], values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)), labels, rotation=30, ha="right")
    ax.set_ylabel("score (points)")
    ax.set_ylim(0, 105)
    ax.set_title(title or f"VL {report['vl_score'] or 0:.1f} vs VA {report['va_score'] or 0:.1f} (n={report['n']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(curves: dict[str, list[float]], path: str, title: str) -> None:
    """One line per curve (e.g. "typed: question->image"), x = layer, y = attention share."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3,
                linestyle="--" if "spoken" in label else "-", label=label)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("attention share")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
