"""Evaluation metrics and plots shared by the training modules.

Bootstrap resampling is over groups (patients) when they are given, because images of one
patient are not independent and an image-level bootstrap would give intervals that are too
narrow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import binomtest  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)


def bootstrap_auc(
    y_true: np.ndarray,
    score: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float | list[float] | int | None]:
    """ROC AUC with a percentile 95% CI (`bootstrap_ci` over `groups`, default each sample);
    None when only one class is present."""
    y_true = np.asarray(y_true).astype(int)
    score = np.asarray(score, dtype=float)
    if len(np.unique(y_true)) < 2:
        return {"auc": None, "ci95": None, "n_pos": int(y_true.sum()), "n": len(y_true)}

    def auc_of(idx: np.ndarray) -> float | None:
        """Undefined (None) on a resample that drew one class only."""
        if len(np.unique(y_true[idx])) < 2:
            return None
        return float(roc_auc_score(y_true[idx], score[idx]))

    groups = np.arange(len(y_true)) if groups is None else np.asarray(groups)
    return {"auc": float(roc_auc_score(y_true, score)),
            "ci95": bootstrap_ci(auc_of, groups, n_boot, seed),
            "n_pos": int(y_true.sum()), "n": len(y_true)}


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017), equal-width confidence bins.

    MONAI's CalibrationErrorMetric is class-wise (made for segmentation maps), not the top-label
    ECE that classifier papers report, hence this short version.
    """
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def sensitivity_specificity(y_true: np.ndarray, predicted: np.ndarray) -> dict:
    """Binary sensitivity and specificity with their counts and Wilson 95% CIs (scipy); None
    where the class is absent. With a handful of patients the CI is the message."""
    y_true = np.asarray(y_true).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    out: dict = {}
    for name, hits, n in (("sensitivity", int((predicted & y_true).sum()), int(y_true.sum())),
                          ("specificity", int((~predicted & ~y_true).sum()),
                           int((~y_true).sum()))):
        out[name] = hits / n if n else None
        interval = binomtest(hits, n).proportion_ci(method="wilson") if n else None
        out[f"{name}_ci95"] = None if interval is None else [float(interval.low),
                                                             float(interval.high)]
        out[f"{name}_counts"] = [hits, n]
    return out


def youden_threshold(y_true: np.ndarray, score: np.ndarray) -> float:
    """The score threshold that maximises sensitivity + specificity (picked on validation)."""
    fpr, tpr, thresholds = roc_curve(y_true, score)
    return float(min(thresholds[np.argmax(tpr - fpr)], 1.0))


def macro_f1(y_true: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over the classes present in y_true (absent classes would be zero by fiat)."""
    present = sorted(set(np.asarray(y_true).tolist()))
    return float(f1_score(y_true, predicted, labels=present, average="macro", zero_division=0))


def plot_roc(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str, path: Path
) -> None:
    """One ROC curve per (name, y_true, score)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, y_true, score in curves:
        if len(np.unique(y_true)) == 2:
            RocCurveDisplay.from_predictions(y_true, score, name=name, ax=ax)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(
    y_true: np.ndarray, predicted: np.ndarray, labels: Sequence[str], title: str, path: Path
) -> None:
    matrix = confusion_matrix(y_true, predicted, labels=list(range(len(labels))))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ConfusionMatrixDisplay(matrix, display_labels=list(labels)).plot(ax=ax, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float | None],
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[float] | None:
    """Percentile 95% CI of `statistic(indices)` over groups (patients) resampled with
    replacement; resamples where the statistic is undefined (None or NaN) are dropped."""
    groups = np.asarray(groups)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    if not members:
        return None
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(unique), len(unique))])
        value = statistic(idx)
        if value is not None and np.isfinite(value):
            samples.append(value)
    if not samples:
        return None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def reliability_points(y_true: np.ndarray, probs: np.ndarray, bins: int = 10
                       ) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per non-empty equal-width top-label bin."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1], right=True),
                    0, bins - 1)
    return [(float(confidence[which == b].mean()), float(correct[which == b].mean()),
             int((which == b).sum())) for b in range(bins) if (which == b).any()]
