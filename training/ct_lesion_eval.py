"""Evaluate the CT lesion UNet: `python -m training evaluate ct-lesion --out models/ct-lesion`.

Two kinds of evidence, kept apart in metrics.json:
- Dice/IoU on the 48 Inf-Net test slices (8-bit, the training domain; no patient ids, so the
  same patient may appear in training: optimistic).
- On real HU series, through the node's own path (lungs from HU, HU window from spec.json,
  crop, network): lesion burden per series, and agreement of predicted lesion area with the
  COVID-CT-MD per-slice infection labels (a check of the HU window, not a segmentation score).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot

from covid_plugin.ml.ct_lesion import LesionSegmenter
from covid_plugin.ml.ct_lung import segment_lungs
from covid_plugin.ml.ct_window import hu_to_unit, window_bounds
from training.ct_plots import LESION_COLOURS, overlay, save_grid, tile
from training.ct_series import covid_ct_md_slice_labels, load_hu_series
from training.metrics import bootstrap_auc

REPO = Path(__file__).resolve().parents[1]
LEAKAGE_NOTE = ("MedSeg has no patient ids: test slices may come from patients also in the "
                "training slices, so these Dice values are optimistic")


def _dice(pred: np.ndarray, true: np.ndarray) -> float | None:
    denominator = pred.sum() + true.sum()
    return float(2 * (pred & true).sum() / denominator) if denominator else None


def _iou(pred: np.ndarray, true: np.ndarray) -> float | None:
    union = (pred | true).sum()
    return float((pred & true).sum() / union) if union else None


def slice_metrics(pred: torch.Tensor, true: torch.Tensor, seed: int) -> dict:
    """Pooled and mean-per-slice Dice/IoU for GGO, consolidation and any lesion (union)."""
    out: dict = {}
    pred_oh, true_oh = one_hot(pred, 3), one_hot(true, 3)
    for name, fn in (("dice_mean_per_slice", DiceMetric), ("iou_mean_per_slice", MeanIoU)):
        metric = fn(include_background=False, reduction="mean_batch", ignore_empty=True)
        metric(pred_oh, true_oh)
        values = metric.aggregate()
        out[name] = {"ggo": float(values[0]), "consolidation": float(values[1])}
        binary = fn(include_background=False, reduction="mean", ignore_empty=True)
        binary(one_hot((pred > 0).long(), 2), one_hot((true > 0).long(), 2))
        out[name]["lesion"] = float(binary.aggregate())
    p, t = pred.numpy()[:, 0], true.numpy()[:, 0]
    out["dice_pooled"] = {
        "ggo": _dice(p == 1, t == 1), "consolidation": _dice(p == 2, t == 2),
        "lesion": _dice(p > 0, t > 0),
    }
    out["iou_pooled"] = {
        "ggo": _iou(p == 1, t == 1), "consolidation": _iou(p == 2, t == 2),
        "lesion": _iou(p > 0, t > 0),
    }
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(1000):
        idx = rng.integers(0, len(p), len(p))
        boots.append(_dice(p[idx] > 0, t[idx] > 0))
    out["dice_pooled"]["lesion_ci95_slice_bootstrap"] = [
        float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))
    ]
    return out


def evaluate_test_slices(segmenter: LesionSegmenter, data: Path, limit: int | None, seed: int,
                         out: Path) -> dict:
    from training.ct_lesion import load_slices

    slices = load_slices(data, "test", limit)
    x = torch.stack([s["image"] for s in slices])
    true = torch.stack([s["label"] for s in slices]).long()
    with torch.inference_mode():
        pred = torch.cat([segmenter.network(x[i:i + 8]).argmax(1, keepdim=True)
                          for i in range(0, len(x), 8)])
    pred = pred * torch.stack([s["valid"] for s in slices])  # padding is never lesion
    metrics = slice_metrics(pred, true, seed)
    metrics["n_slices"] = len(slices)
    metrics["note"] = LEAKAGE_NOTE
    rows = []
    for i in np.linspace(0, len(slices) - 1, min(6, len(slices))).astype(int):
        grey = x[i, 0].numpy()
        rows.append([
            tile(overlay(grey, np.zeros_like(grey), {}), 200, "8-bit slice"),
            tile(overlay(grey, true[i, 0].numpy(), LESION_COLOURS), 200, "reference"),
            tile(overlay(grey, pred[i, 0].numpy(), LESION_COLOURS), 200, "model"),
        ])
    save_grid(rows, out / "overlay_test_slices.png")
    return metrics


def evaluate_hu_series(segmenter: LesionSegmenter, data: Path, out: Path, limit: int | None
                       ) -> dict:
    """Lesion burden on every real HU series and per-slice agreement with COVID-CT-MD labels."""
    lower, upper = window_bounds(segmenter.spec.intensity)
    slice_labels = covid_ct_md_slice_labels(data)
    per_series, rows = {}, []
    areas, infected, patients = [], [], []
    for series in load_hu_series(data)[:limit]:
        lung = segment_lungs(series.hu, series.spacing)
        lesion = segmenter.predict(series.hu, lung)
        voxel_ml = float(np.prod(series.spacing)) / 1000.0
        lung_ml = float((lung > 0).sum() * voxel_ml)
        per_series[series.name] = {
            "label": series.label,
            "slices": int(series.hu.shape[0]),
            "lung_ml": lung_ml,
            "ggo_ml": float((lesion == 1).sum() * voxel_ml),
            "consolidation_ml": float((lesion == 2).sum() * voxel_ml),
            "lesion_percent_of_lung": float(100 * (lesion > 0).sum() / max((lung > 0).sum(), 1)),
        }
        if series.name in slice_labels:
            labels = slice_labels[series.name]
            for i, z in enumerate(series.positions_z):
                areas.append(float((lesion[i] > 0).sum() * voxel_ml))
                infected.append(labels[round(z, 1)])
                patients.append(series.name)
        picks = sorted({0, series.hu.shape[0] // 2, series.hu.shape[0] - 1})
        rows.append([
            tile(overlay(hu_to_unit(series.hu[i], lower, upper), lesion[i], LESION_COLOURS),
                 220, f"{series.name[-26:]} #{i}")
            for i in picks
        ])
    save_grid(rows, out / "overlay_hu_series.png")
    y, score = np.array(infected), np.array(areas)
    agreement = bootstrap_auc(y, score, groups=None)
    agreement["note"] = ("per-slice AUC of predicted lesion volume vs COVID-CT-MD infection label "
                         "(InstanceNumber reading), slices of 3 patients (COVID, CAP, normal); "
                         "slices are not independent")
    return {"per_series": per_series, "covid_ct_md_slice_label_auc": agreement}


def evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    data, out = Path(args.data), Path(args.out or REPO / "models" / "ct-lesion")
    segmenter = LesionSegmenter.load(out)
    metrics = {
        "model": {"name": segmenter.spec.name, "version": segmenter.spec.version,
                  "weights_sha256": segmenter.spec.weights_sha256},
        "test_slices_8bit": evaluate_test_slices(segmenter, data, args.limit, args.seed, out),
        "real_hu_series": evaluate_hu_series(segmenter, data, out, args.limit),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    test = metrics["test_slices_8bit"]
    spec = json.loads((out / "spec.json").read_text())
    spec["metrics"] = {
        "lesion_dice_pooled": test["dice_pooled"]["lesion"],
        "ggo_dice_pooled": test["dice_pooled"]["ggo"],
        "consolidation_dice_pooled": test["dice_pooled"]["consolidation"],
        "on": f"{test['n_slices']} Inf-Net test slices; {LEAKAGE_NOTE}",
        "details": "metrics.json",
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    from training.ct_cards import write_lesion_card

    write_lesion_card(out, segmenter.spec, metrics)
    return 0
