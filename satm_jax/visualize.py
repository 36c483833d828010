"""Pictures of the results: image grids of synthetic sets and training curves (PNG)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np


def image_grid(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    max_per_class: int = 10,
    max_classes: int = 20,
    pad: int = 1,
) -> np.ndarray:
    """Arranges ``[0, 1]`` images ``(n, H, W, C)`` into one ``(rows*H', cols*W', 3)`` array.

    With several images per class each row is a class (at most ``max_classes`` rows and
    ``max_per_class`` columns); with one image per class, the classes fill a near-square grid.
    """
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels.argmax(-1)
    n, h, w, _ = images.shape
    per_class = [np.flatnonzero(labels == c)[:max_per_class] for c in range(num_classes)]
    ipc = max((len(p) for p in per_class), default=0)
    if ipc <= 1:
        chosen = [p[0] for p in per_class if len(p)][: max_classes * max_per_class]
        cols = math.ceil(math.sqrt(len(chosen)))
        rows = math.ceil(len(chosen) / max(cols, 1))
        cells = [
            [chosen[r * cols + c] if r * cols + c < len(chosen) else None for c in range(cols)]
            for r in range(rows)
        ]
    else:
        cells = [
            [p[j] if j < len(p) else None for j in range(ipc)] for p in per_class[:max_classes]
        ]
        rows, cols = len(cells), ipc
    out = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.float32)
    for r, row in enumerate(cells):
        for c, i in enumerate(row):
            if i is None:
                continue
            y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
            out[y0 : y0 + h, x0 : x0 + w] = images[i]
    return out


def _figure(figsize: tuple[float, float]):
    """A matplotlib Figure with its own Agg canvas: no pyplot, no global backend change
    (notebooks keep their inline plotting)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_image_grid(
    path: str,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    scale: int | None = None,
    title: str | None = None,
) -> str:
    """Writes ``image_grid(...)`` as a PNG, upscaled so small images stay visible."""
    grid = image_grid(images, labels, num_classes)
    if scale is None:
        scale = (
            max(1, 256 // max(grid.shape[0], grid.shape[1]) + 1) if max(grid.shape[:2]) < 256 else 1
        )
    grid = np.kron(grid, np.ones((scale, scale, 1), np.float32))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if title is None:
        import matplotlib.image

        matplotlib.image.imsave(path, grid)
        return path
    fig = _figure((grid.shape[1] / 100 + 0.2, grid.shape[0] / 100 + 0.5))
    ax = fig.add_subplot()
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_history(
    path: str,
    iterations: Sequence[int],
    losses: Sequence[float],
    eval_iterations: Sequence[int] = (),
    eval_accs: Sequence[float] = (),
    title: str = "",
    syn_lrs: Sequence[float] | None = None,
    image_updates: Sequence[float] | None = None,
    sharpness: Sequence[float] | None = None,
    norms: dict[str, Sequence[float]] | None = None,
) -> str:
    """Matching loss (raw and smoothed over a tenth of the run) with the evaluation accuracy
    (if any); below it, when given: the step size, the relative image update, the sharpness
    ``L(X + eps) - L(X)`` of a sharpness-aware run, and norms (``||h||``, ``||eps||``,
    ``||X||``, ``||dX||``, one line each, log scale). One PNG."""
    from satm_jax.convergence import smooth

    panels = 1 + (syn_lrs is not None) + (image_updates is not None)
    panels += (sharpness is not None) + bool(norms)
    fig = _figure((7, 3 + 2 * (panels - 1)))
    axes = [fig.add_subplot(panels, 1, i + 1) for i in range(panels)]
    ax1 = axes[0]
    ax1.plot(iterations, losses, color="tab:blue", lw=0.5, alpha=0.4, label="matching loss")
    window = max(1, len(losses) // 10)
    ax1.plot(iterations, smooth(losses, window), color="tab:blue", lw=1.5, label="smoothed")
    ax1.set_ylabel("matching loss", color="tab:blue")
    ax1.legend(loc="upper right", fontsize=7)
    if len(eval_iterations):
        ax2 = ax1.twinx()
        ax2.plot(eval_iterations, eval_accs, "o-", color="tab:red", label="test accuracy (%)")
        ax2.set_ylabel("test accuracy (%)", color="tab:red")
    ax1.set_title(title)
    rest = axes[1:]
    if syn_lrs is not None:
        ax = rest.pop(0)
        ax.plot(iterations, syn_lrs, color="tab:green", lw=1.0)
        ax.set_ylabel("step size alpha")
    if image_updates is not None:
        ax = rest.pop(0)
        ax.plot(iterations, image_updates, color="tab:purple", lw=0.5)
        ax.set_yscale("log")
        ax.set_ylabel("||dX|| / ||X||")
    if sharpness is not None:
        ax = rest.pop(0)
        ax.plot(iterations, sharpness, color="tab:orange", lw=0.5, alpha=0.4)
        ax.plot(iterations, smooth(sharpness, window), color="tab:orange", lw=1.5)
        ax.axhline(0.0, color="0.5", lw=0.5)
        ax.set_ylabel("L(X+eps) - L(X)")
    if norms:
        ax = rest.pop(0)
        for name, values in norms.items():
            ax.plot(iterations, values, lw=0.8, label=name)
        ax.set_yscale("log")
        ax.set_ylabel("norm")
        ax.legend(loc="upper right", fontsize=7, ncol=len(norms))
    axes[-1].set_xlabel("iteration")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def plot_ood_heatmap(path: str, labels: Sequence[str], summaries: Sequence[dict]) -> str:
    """One heat map per evaluated set: test accuracy (%) per corruption (rows) and severity
    (columns), on one shared colour scale, with the values written in the cells.

    Args:
      path: PNG to write.
      labels: a title per set (e.g. ``"satm ipc1"``).
      summaries: the ``"ood"`` objects of ``satm_jax.ood.summarise``, same corruptions.
    """
    names = list(summaries[0]["acc"])
    sev = [str(s) for s in summaries[0]["severities"]]
    grids = [np.array([[s["acc"][n][k] for k in sev] for n in names]) for s in summaries]
    lo = min(float(g.min()) for g in grids)
    hi = max(float(g.max()) for g in grids)
    cols = len(grids)
    fig = _figure((1.2 + 0.55 * len(sev) * cols + 0.8 * cols, 0.8 + 0.3 * len(names)))
    axes = [fig.add_subplot(1, cols, i + 1) for i in range(cols)]
    for i, (ax, g, title) in enumerate(zip(axes, grids, labels)):
        im = ax.imshow(g, vmin=lo, vmax=hi, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(sev)), sev, fontsize=7)
        ax.set_yticks(range(len(names)), names if i == 0 else [""] * len(names), fontsize=7)
        ax.set_xlabel("severity", fontsize=7)
        ax.set_title(f"{title}\nmean {summaries[i]['mean_corruption_acc']:.1f}%", fontsize=8)
        for r in range(g.shape[0]):
            for c in range(g.shape[1]):
                ax.text(c, r, f"{g[r, c]:.0f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=axes, shrink=0.8, label="test accuracy (%)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
