"""Figures the training stages and the pipeline share."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_heatmap(load_LE: np.ndarray, title: str, path: str | Path | None = None):
    """Layers × experts heatmap of assignment fractions; returns the matplotlib figure (or saves it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load_LE = np.asarray(load_LE)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * load_LE.shape[1], 1 + 0.4 * load_LE.shape[0]))
    im = ax.imshow(load_LE, vmin=0, vmax=max(2.0 / load_LE.shape[1], float(load_LE.max())), cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of assignments")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig
