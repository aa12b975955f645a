"""Grad-CAM evidence: the pointing game on radiologist boxes, and the overlay picture."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from covid_plugin.ml.cxr import CLASS_KEYS, CxrClassifier
from training.common.data import Item, read_grey
from training.cxr_classifier.data import is_adult
from training.cxr_classifier.scoring import share

FINDINGS = "cxr_adult_findings/findings.csv"


def read_boxes(data: Path) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """findings.csv: path -> [(box_label, xmin, ymin, xmax, ymax)] in 320 px image pixels."""
    boxes: dict[str, list] = {}
    with open(Path(data) / FINDINGS, newline="") as fh:
        for row in csv.DictReader(fh):
            boxes.setdefault(row["path"], []).append(
                (row["box_label"], *(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return boxes


def peak_in_boxes(heatmap: np.ndarray, boxes: list[tuple[str, float, float, float, float]],
                  scale: tuple[float, float] = (1.0, 1.0)) -> bool:
    """Whether the hottest pixel of `heatmap` falls inside any box.

    Boxes are in the staged image's pixels (x right, y down); `scale` (rows, cols) maps them
    to the heatmap's frame, which `CxrClassifier` already returns in the input image's rows
    and columns (the stretch to 224 px and any crop are undone there). Pixel (r, c) covers
    [c, c + 1) x [r, r + 1), so its centre is tested.
    """
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    y, x = (r + 0.5) / scale[0], (c + 0.5) / scale[1]
    return any(x0 <= x <= x1 and y0 <= y <= y1 for _, x0, y0, x1, y1 in boxes)


def pointing(clf: CxrClassifier, items: list[Item], idx: np.ndarray, data: Path,
             patients: np.ndarray) -> dict:
    """Grad-CAM pointing game on NIH pneumonia/consolidation films with radiologist boxes.

    Two heatmaps: the one the node shows (the called class) and the pneumonia_other class's;
    two box sets: any radiologist box on the film (a pneumonia film's box may mark its
    effusion), and, on films that have one, the "Pneumonia" boxes alone. The chance level is
    the share of the image the boxes cover (a peak dropped at random).
    """
    boxes = read_boxes(data)
    films = [i for i in idx if items[i].path in boxes and items[i].label == "pneumonia_other"]
    if not films:
        return {"films": 0}
    rows = []
    for i in films:
        image = read_grey(data / items[i].path)
        pred = clf.predict(image)
        maps = {"called": pred.heatmap, "pneumonia_other": clf.explain(image, "pneumonia_other")}
        for subset in ("any_box", "pneumonia_box"):
            film_boxes = [b for b in boxes[items[i].path]
                          if subset == "any_box" or b[0] == "Pneumonia"]
            if not film_boxes:
                continue
            covered = np.zeros(image.shape, dtype=bool)
            for _, x0, y0, x1, y1 in film_boxes:
                covered[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
            rows.append((subset, patients[i], pred.called, covered.mean(),
                         {k: peak_in_boxes(m, film_boxes) for k, m in maps.items()}))
    result: dict = {"films": len(films)}
    for subset in ("any_box", "pneumonia_box"):
        part = [r for r in rows if r[0] == subset]
        g = np.array([r[1] for r in part])
        result[subset] = {
            "heatmap_of_called_class": share(np.array([r[4]["called"] for r in part]), g),
            "heatmap_of_pneumonia_other": share(
                np.array([r[4]["pneumonia_other"] for r in part]), g),
            "chance_box_area_share": float(np.mean([r[3] for r in part])) if part else None,
            "called": {k: sum(r[2] == k for r in part) for k in CLASS_KEYS},
        }
    return result


def plot_heatmaps(clf: CxrClassifier, items: list[Item], test: np.ndarray, data: Path,
                  path: Path) -> None:
    """GradCAM overlays (of the CALLED class) on one held-out adult film per (source, label),
    through the node's predict(). Only CC0 / CC BY films: the card ships in the repository."""
    picks: dict[tuple[str, str], int] = {}
    for i in test:
        if items[i].licence.startswith(("CC0", "CC-BY-3", "CC-BY-4")) and is_adult(items[i]):
            picks.setdefault((items[i].source, items[i].label), int(i))
    fig, axes = plt.subplots(1, max(len(picks), 1), figsize=(3.2 * max(len(picks), 1), 3.6),
                             squeeze=False)
    for ax, ((source, label), i) in zip(axes[0], sorted(picks.items()), strict=False):
        image = read_grey(data / items[i].path)
        pred = clf.predict(image)
        ax.imshow(image, cmap="gray")
        ax.imshow(pred.heatmap, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(f"{source} / {label}\ncalled {pred.called} "
                     f"(p {pred.probabilities[pred.called]:.2f})", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
