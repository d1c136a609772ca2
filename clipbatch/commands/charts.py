"""The charts eval writes as PNG files and the report embeds: matplotlib, headless (Agg).

Every function takes plain numbers and returns PNG bytes, so the same chart can
be written to an object store (eval) or inlined as a data URI (report) and
nothing here knows where the numbers came from.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on workers, CI or servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter  # noqa: E402

_COLOR = "#3b6ea8"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plain_log(axis) -> None:
    """A log axis labelled 100, 1000 rather than 10^2, 10^3 (sizes and ratios read better so)."""
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


def _size_for(n_labels: int) -> tuple[float, float]:
    return (max(6.0, 0.28 * n_labels + 2), 4.0)


def bars(labels: list[str], values: list[float], title: str, ylabel: str, ylim: tuple | None = None) -> bytes:
    """One bar per label (classes, error reasons): distributions and per-class numbers."""
    fig, ax = plt.subplots(figsize=_size_for(len(labels)))
    ax.bar(range(len(labels)), values, color=_COLOR)
    ax.set_xticks(range(len(labels)), labels, rotation=60 if len(labels) > 6 else 0, ha="right" if
                  len(labels) > 6 else "center", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if all(float(v).is_integer() for v in values):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def histogram(values: np.ndarray, bins, title: str, xlabel: str, log_x: bool = False) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=bins, color=_COLOR, edgecolor="white")
    if log_x:
        ax.set_xscale("log")
        _plain_log(ax.xaxis)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    return _png(fig)


def scatter(x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str) -> bytes:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(x, y, s=8, alpha=0.5, color=_COLOR)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log(ax.xaxis)
    _plain_log(ax.yaxis)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _png(fig)


def confusion(matrix: np.ndarray, classes: list[str]) -> bytes:
    """Rows true class, columns predicted; each row normalized so that classes of any size compare."""
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape, float), where=totals > 0)
    side = max(5.0, 0.3 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=90, fontsize=7)
    ax.set_yticks(ticks, classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (share of each true class)")
    if len(classes) <= 12:
        for i in ticks:
            for j in ticks:
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)


def reliability(curves: dict[str, list[dict]]) -> bytes:
    """Accuracy against mean confidence per bin, one line per curve (before/after calibration)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    for name, table in curves.items():
        used = [b for b in table if b["count"]]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)
