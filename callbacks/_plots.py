"""Line plots of metrics, drawn on a bare matplotlib ``Figure``.

A bare ``Figure`` (not ``pyplot``) needs no GUI backend and touches no global state, so plotting from a
callback cannot change the backend of a notebook; TensorBoard renders it with the Agg canvas.
matplotlib (the ``plots`` extra) is imported when a plot is drawn; callbacks that plot call
:func:`require_plots` at set-up, so a missing extra fails before training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_ddd.extras import require

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def require_plots(owner: object) -> None:
    """Fail now, naming the extra, if matplotlib is missing."""
    require("matplotlib", feature=f"{type(owner).__name__}'s plots")


def data_references(datamodule) -> dict[str, float]:
    """Values perfect samples would reach: the data's entropy per token is the expected oracle NLL of
    samples from the data itself (MarkovChain knows it exactly)."""
    exact_entropy = getattr(datamodule, "exact_entropy", None)
    return {"oracle_nll": exact_entropy() / datamodule.seq_len} if callable(exact_entropy) else {}


def metric_lines(rows: list[dict], x: str, line: str, metrics: list[str], xlabel: str, log2_x: bool = False,
                 title: str | None = None, references: dict[str, float] | None = None) -> Figure:
    """One panel per metric, the metric against ``row[x]``, one line per distinct ``row[line]`` label.

    Rows missing a metric (e.g. no oracle for the teacher) are skipped in that panel; ``references`` draws a
    dashed horizontal line labelled "data" in the panel of each metric it names.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.0 * len(metrics), 3.2), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    labels = list(dict.fromkeys(row[line] for row in rows))  # first-seen order
    for ax, metric in zip(axes, metrics):
        for label in labels:
            points = sorted((row[x], row[metric]) for row in rows if row[line] == label and metric in row)
            if points:
                ax.plot(*zip(*points), marker="o", label=str(label))
        if metric in (references or {}):
            ax.axhline(references[metric], color="grey", linestyle="--", label="data")
            ax.legend(fontsize="small")
        if log2_x:
            xs = sorted({row[x] for row in rows})
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(v) for v in xs])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return figure
