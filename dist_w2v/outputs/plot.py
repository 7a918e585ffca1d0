"""The loss curve of a run as a PNG, like the seed's animator plot.

Drawn with matplotlib's object API on an Agg canvas: no pyplot, so no global backend is chosen
and nothing needs a display (compute nodes, CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_w2v.atomic import write_with


def plot_loss_curve(history: list[dict[str, Any]], path: Path,
                    title: str | None = None) -> Path | None:
    """Per-step window losses as a line and per-epoch losses as dots, against the global step.

    ``title`` (the run's name) heads the plot and is stored as the PNG's Title. The file is
    replaced atomically; an ``OSError`` (a full disk) leaves the previous plot. Returns the file
    written, or None when the history holds no loss to draw.
    """
    steps = [r for r in history if r.get("kind") == "step"]
    epochs = [r for r in history if r.get("kind") == "epoch"]
    if not steps and not epochs:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if steps:
        axes.plot([r["global_step"] for r in steps], [r["loss"] for r in steps],
                  lw=1, label="loss (every log.every_steps)")
    if epochs:
        # An epoch's mean belongs to the middle of the steps it averages, not to its last step.
        ends = [r["global_step"] for r in epochs]
        middles = [(start + end) / 2 for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        axes.plot(middles, [r["loss"] for r in epochs], "o", label="epoch mean loss")
    if title:
        axes.set_title(title)
    axes.set_xlabel("global step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    metadata = {"Title": title} if title else {}
    write_with(Path(path), lambda out: figure.savefig(out, format="png", metadata=metadata))
    return Path(path)
