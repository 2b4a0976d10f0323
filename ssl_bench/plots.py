"""PNG plots (matplotlib's Agg canvas, no display needed), each written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

from .io import atomic_write


def _save(path: Path, panels: int, draw: Callable[[list], None], width: float = 6.4, height: float = 4.4) -> Path:
    """A figure of ``panels`` side-by-side axes, filled by ``draw(axes)``, saved as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def write(tmp: str) -> None:
        figure = Figure(figsize=(width * panels, height), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, panels, squeeze=False)[0]
        draw(list(axes))
        figure.tight_layout()
        figure.savefig(tmp, format="png")

    atomic_write(path, write)
    return path


def save_line_plot(path: Path, x: Sequence[float], y: Sequence[float], labels: Sequence[str], title: str,
                   xlabel: str, ylabel: str) -> Path:
    """A line plot of y against x (tick ``labels`` at x; nan points left out)."""
    def draw(axes: list) -> None:
        axes[0].plot(x, y, marker="o")
        axes[0].set_xticks(list(x), list(labels), rotation=45 if len(x) > 8 else 0)
        axes[0].set(title=title, xlabel=xlabel, ylabel=ylabel)
        axes[0].grid(alpha=0.3)

    return _save(path, 1, draw)


def save_grouped_bars(path: Path, panels: Sequence[tuple[str, dict[str, Sequence[float]]]],
                      categories: Sequence[str], ylabel: str) -> Path:
    """One panel per (title, {series: one value per category}): bars grouped by category, one bar per series;
    nan values leave a gap."""
    def draw(axes: list) -> None:
        for ax, (title, series) in zip(axes, panels):
            width = 0.8 / max(1, len(series))
            for i, (name, values) in enumerate(series.items()):
                xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
                ax.bar(xs, [0.0 if math.isnan(v) else v for v in values], width, label=name)
            ax.set_xticks(range(len(categories)), list(categories))
            ax.set(title=title, ylabel=ylabel)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.08))  # below: bars stay visible

    most = max((len(series) for _, series in panels), default=1)
    return _save(path, max(1, len(panels)), draw, height=4.0 + 0.2 * most)


def save_curves(path: Path, x: Sequence[float], curves: Sequence[tuple[str, Sequence[float]]], xlabel: str) -> Path:
    """One panel per (title, values against x), side by side; nan points left out."""
    def draw(axes: list) -> None:
        for ax, (title, values) in zip(axes, curves):
            ax.plot(x, values, marker="o")
            ax.set(title=title, xlabel=xlabel)
            ax.grid(alpha=0.3)

    return _save(path, max(1, len(curves)), draw, width=4.4, height=3.6)
