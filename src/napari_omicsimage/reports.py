"""Tables and PNG plots of cross-validation results.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot),
so writing a report never touches the GUI backend napari is using.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

#: (metric key, column title) in the order tables show them
TABLE_COLUMNS = (("accuracy", "acc"), ("balanced_accuracy", "bal_acc"), ("precision_macro", "prec"),
                 ("recall_macro", "recall"), ("f1_macro", "f1"), ("roc_auc_ovo_macro", "auc_ovo"))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fmt(value) -> str:
    return "   n/a" if value is None or not np.isfinite(value) else f"{value:6.3f}"


def metrics_table(result) -> str:
    """Plain-text table: one row per fold, mean ± sd, and the baseline beside."""
    metrics = result.metrics
    names = [title for _, title in TABLE_COLUMNS]
    lines = [f"{'':14s}" + "".join(f"{n:>16s}" for n in names)]
    for row in metrics["folds"]:
        lines.append(f"{'fold ' + str(row['fold']):14s}" + "".join(f"{_fmt(row[k]):>16s}" for k, _ in TABLE_COLUMNS))
    mean, sd = metrics["mean"], metrics["sd"]
    lines.append(f"{'mean ± sd':14s}" + "".join(
        f"{_fmt(mean[k]).strip() + ' ± ' + _fmt(sd[k]).strip():>16s}" for k, _ in TABLE_COLUMNS))
    if "baseline" in metrics:
        base, base_sd = metrics["baseline"], metrics["baseline_sd"]
        lines.append(f"{'baseline (LR)':14s}" + "".join(
            f"{_fmt(base[k]).strip() + ' ± ' + _fmt(base_sd[k]).strip():>16s}" for k, _ in TABLE_COLUMNS))
    protocol = metrics["protocol"]
    header = (f"{protocol['model']} on {protocol['layout'].get('method')} images, {len(metrics['folds'])}/"
              f"{protocol['folds']} folds, {protocol['epochs']} epochs, batch {protocol['batch_size']}, "
              f"Adam lr {protocol['lr']:g}" + (", TRANSDUCTIVE" if protocol["transductive"] else ""))
    footer = []
    for key in ("wilcoxon_vs_baseline", "comparison"):
        test = metrics.get(key)
        if test:
            footer.append(f"Wilcoxon {test['model_a']} vs {test['model_b']} ({test['metric']}): "
                          f"mean difference {test['mean_difference']:+.3f}, p = {test['p_value']:.4f}")
    if metrics.get("cancelled"):
        footer.append("cancelled: only the finished folds are shown")
    return "\n".join([header, *lines, *footer])


def metrics_frame(result) -> pd.DataFrame:
    """Long table for ``metrics.csv``: model, row (fold N / mean / sd) and one column per metric."""
    metrics = result.metrics
    rows = []
    for row in metrics["folds"]:
        rows.append({"model": metrics["protocol"]["model"], "row": f"fold {row['fold']}",
                     **{k: row[k] for k, _ in TABLE_COLUMNS}})
    rows.append({"model": metrics["protocol"]["model"], "row": "mean", **metrics["mean"]})
    rows.append({"model": metrics["protocol"]["model"], "row": "sd", **metrics["sd"]})
    if "baseline" in metrics:
        for row in metrics["baseline_folds"]:
            rows.append({"model": "logistic_regression", "row": f"fold {row['fold']}",
                         **{k: row[k] for k, _ in TABLE_COLUMNS}})
        rows.append({"model": "logistic_regression", "row": "mean", **metrics["baseline"]})
        rows.append({"model": "logistic_regression", "row": "sd", **metrics["baseline_sd"]})
    return pd.DataFrame(rows, columns=["model", "row", *[k for k, _ in TABLE_COLUMNS]])


def plot_loss_curves(result, path) -> Path:
    """Mean training loss per epoch, one line per fold (the paper's Figures 1 and 3)."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for f, curve in enumerate(result.loss_curves):
        ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", label=f"fold {f + 1}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"Training loss per fold — {result.config.model}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return Path(path)


def _confusion_axes(fig, ax, matrix, classes, title):
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{matrix[i, j]:.1f}", ha="center", va="center", fontsize="small",
                    color="white" if share[i, j] > 0.6 else "black")
    return image


def plot_confusion_matrix(result, path) -> Path:
    """Mean confusion matrix over folds (counts written, colour = share of the true class)."""
    has_baseline = bool(result.baseline_confusion_matrices)
    fig = _figure(10 if has_baseline else 5.5, 4.6)
    axes = fig.subplots(1, 2 if has_baseline else 1, squeeze=False)[0]
    image = _confusion_axes(fig, axes[0], result.mean_confusion, result.classes,
                            f"{result.config.model}: mean over {len(result.confusion_matrices)} folds")
    if has_baseline:
        _confusion_axes(fig, axes[1], np.mean(result.baseline_confusion_matrices, axis=0), result.classes,
                        "logistic-regression baseline")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of true class")
    fig.savefig(path)
    return Path(path)


def plot_roc_curves(result, path) -> Path:
    """One-vs-rest ROC curve per class from the pooled out-of-fold probabilities."""
    from sklearn.metrics import auc, roc_curve

    fig = _figure(6, 5)
    ax = fig.add_subplot()
    truth = result.predictions["true"].to_numpy()
    for name in result.classes:
        positive = truth == name
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, result.predictions[f"prob_{name}"].to_numpy())
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC, one class vs rest (out-of-fold) — {result.config.model}")
    ax.legend(fontsize="small", loc="lower right")
    fig.savefig(path)
    return Path(path)
