"""Figure export shared by the notebooks: every figure goes out as PNG and PDF."""
from __future__ import annotations

from pathlib import Path

from earlyexit.core.atomic import atomic_path


def save_figure(fig, name: str, figures_dir: str | Path = "figures", dpi: int = 150) -> list[Path]:
    """Write ``fig`` to ``figures_dir/name.png`` and ``.pdf`` (atomically); returns the paths."""
    out = []
    for ext in ("png", "pdf"):
        path = Path(figures_dir) / f"{name}.{ext}"
        with atomic_path(path, suffix="." + ext) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext)
        out.append(path)
    return out


def plot_choice_panels(reading, layers, axes=None, title: str | None = None):
    """One bar panel per layer entry: probability of each choice's first sub-token (gold in green)."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers), 2.6), sharey=False)
    choices = reading.question.choices
    gold = set(reading.question.gold)
    colors = ["tab:green" if c in gold else "tab:gray" for c in choices]
    for ax, entry in zip(axes, layers):
        p = reading.probs[reading.layers.index(entry)].numpy()
        ax.bar(range(len(choices)), p, color=colors)
        ax.set_xticks(range(len(choices)), choices, rotation=60, fontsize=8)
        ax.set_title(f"layer {entry}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].set_ylabel("p(first sub-token)")
    if title:
        axes[0].figure.suptitle(title, fontsize=10)
    return axes
