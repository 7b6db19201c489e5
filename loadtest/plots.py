"""PNG plots for the benchmark sections and the soak (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def bars(
    path: Path,
    title: str,
    groups: Mapping[str, Mapping[str, float]],
    ylabel: str,
    *,
    target: float | None = None,
) -> Path:
    """Grouped bars: ``groups`` maps a series name to {category: value}; an optional dashed target line."""
    plt = _pyplot()
    categories = list(dict.fromkeys(c for series in groups.values() for c in series))
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for i, (series, values) in enumerate(groups.items()):
        xs = [c + (i - (len(groups) - 1) / 2) * width for c in range(len(categories))]
        heights = [values.get(c, 0.0) for c in categories]
        drawn = ax.bar(xs, heights, width, label=series)
        ax.bar_label(drawn, fmt="%.3g", fontsize=7)
    if target is not None:
        ax.axhline(target, linestyle="--", color="grey", linewidth=1, label=f"target {target:g}")
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(groups) > 1 or target is not None:
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def lines(
    path: Path,
    title: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    *,
    right: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    right_label: str = "",
) -> Path:
    """One line per series of (x, y) points; ``right`` series share x but get their own axis on the right."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    axes = [(ax, series, ylabel)]
    if right:
        axes.append((ax.twinx(), right, right_label))
    handles = []
    for i, (axis, group, label) in enumerate(axes):
        for j, (name, points) in enumerate(group.items()):
            drawn = axis.plot(
                [x for x, _ in points], [y for _, y in points], marker=".", label=name, color=f"C{i * 3 + j}"
            )
            handles.extend(drawn)
        axis.set_ylabel(label)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.legend(handles=handles, fontsize=7)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
