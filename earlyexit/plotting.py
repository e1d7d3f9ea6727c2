"""Figure export shared by the notebooks: every figure goes out as PNG and PDF."""
from __future__ import annotations

from pathlib import Path

from earlyexit.atomic import atomic_path


def save_figure(fig, name: str, figures_dir: str | Path = "figures", dpi: int = 150) -> list[Path]:
    """Write ``fig`` to ``figures_dir/name.png`` and ``.pdf`` (atomically); returns the paths."""
    out = []
    for ext in ("png", "pdf"):
        path = Path(figures_dir) / f"{name}.{ext}"
        with atomic_path(path, suffix="." + ext) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext)
        out.append(path)
    return out
