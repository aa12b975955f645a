"""Evaluate the CT lesion UNet: `python -m training evaluate ct-lesion --out models/ct-lesion`.

Kinds of evidence, kept apart in metrics.json:
- Dice/IoU on the 48 Inf-Net test slices (8-bit, the training domain; no patient ids, so the
  same patient may appear in training: optimistic).
- The measurement setting (the mask the node writes and measures) from the trade-off table
  of training/ct_lesion/tradeoff.py: MedSeg Dice (selection on the training slices, test
  reported) against false-positive lesion volume on the normal HU patients (leave one normal
  out), lesion mL of every real HU patient; written to spec.json `thresholds`.
- On the real HU patients, through the node's own path: slice-level detection AUC against the
  COVID-CT-MD slice labels (each patient at the decision's lesion setting chosen without it,
  training/common/ct_lopo.py), volumes at the measurement setting, the label grid before/after.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot

from covid_plugin.ml.ct_lesion import (
    LesionSegmenter,
    filter_lesions,
    hu_to_network_input,
    thorax_box,
)
from covid_plugin.ml.ct_lung import segment_lungs
from covid_plugin.ml.ct_window import hu_to_unit, window_bounds
from training.common import ct_lopo
from training.common.ct_plots import LESION_COLOURS, overlay, save_grid, tile
from training.common.ct_rule import THRESHOLDS as RULE
from training.common.ct_series import read_series, series_slice_labels
from training.common.metrics import bootstrap_auc
from training.common.paths import REPO
from training.ct_lesion import tradeoff as lesion_tradeoff
from training.ct_lesion.card import write_lesion_card
from training.ct_lesion.data import load_slices
from training.ct_lesion.tradeoff import MEDSEG_SPACING, medseg_probabilities

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
                         out: Path | None, setting: tuple[float, float, float]) -> dict:
    """Dice/IoU of the MedSeg test slices at one measurement setting (probability, smallest
    lesion, smallest mean probability), each slice filtered in 2D as `tradeoff.py`
    does; the overlay picture when `out` is given."""
    slices = load_slices(data, "test", limit)
    probability, kind, reference = medseg_probabilities(segmenter, slices)
    pred = torch.from_numpy(np.stack([
        filter_lesions(probability[i:i + 1], kind[i:i + 1], MEDSEG_SPACING, *setting)[0]
        for i in range(len(slices))]))[:, None].long()
    true = torch.from_numpy(reference)[:, None]
    metrics = slice_metrics(pred, true, seed)
    metrics["n_slices"] = len(slices)
    metrics["setting"] = list(setting)
    metrics["note"] = LEAKAGE_NOTE
    if out is None:
        return metrics
    rows = []
    for i in np.linspace(0, len(slices) - 1, min(6, len(slices))).astype(int):
        grey = slices[i]["image"][0].numpy()
        rows.append([
            tile(overlay(grey, np.zeros_like(grey), {}), 200, "8-bit slice"),
            tile(overlay(grey, true[i, 0].numpy(), LESION_COLOURS), 200, "reference"),
            tile(overlay(grey, pred[i, 0].numpy(), LESION_COLOURS), 200, "model"),
        ])
    save_grid(rows, out / "overlay_test_slices.png")
    return metrics


def slice_detection(data: Path, patients: list[ct_lopo.Patient], lopo: list[dict],
                    seed: int) -> dict:
    """Per-slice AUC of predicted lesion volume vs the radiologists' infection label, on the
    whole COVID-CT-MD series, each patient at the setting chosen without it."""
    labels = series_slice_labels(data)
    chosen = {row["patient"]: row["chosen"] for row in lopo}
    y, score, groups, labelled = [], [], [], []
    for patient in patients:
        if patient.name not in labels:
            continue
        fold = chosen[patient.name]
        result = patient.settings[(fold["lesion_probability"], fold["min_lesion_ml"])]
        for z, ml in zip(result["positions_z"], result["slice_ml"], strict=True):
            y.append(labels[patient.name][round(z, 1)])
            score.append(ml)
            groups.append(patient.name)
            labelled.append(patient.label != "normal")
    y_all, score_all = np.array(y), np.array(score)
    groups_all, keep = np.array(groups), np.array(labelled, bool)
    return {
        "labelled_patients": bootstrap_auc(y_all[keep], score_all[keep], groups_all[keep],
                                           seed=seed),
        "with_normals_as_negatives": bootstrap_auc(y_all, score_all, groups_all, seed=seed),
        "patients": sorted(set(groups)),
        "note": "score = predicted lesion mL per slice; 4 mm slices of the whole chest; label "
                "= radiologists' slice-level infection label (InstanceNumber reading); the "
                "normal patients were not slice-labelled (all read as 0); CI by patient "
                "bootstrap, 4-6 patients, so it is wide",
    }


def grid_before_after(data: Path, segmenter: LesionSegmenter, out: Path) -> dict:
    """The label grid of the old path (argmax of bilinearly resized logits) next to the node's
    path, on the real P002 slice with the most lesion; the change-per-pixel statistic of both."""
    hu, spacing, _ = read_series(data / "ct_hu" / "dicom" / "covid-ct-md_P002")
    lung = segment_lungs(hu, spacing)
    lesion = segmenter.predict(hu, lung, spacing)
    i = int(np.argmax((lesion > 0).sum(axis=(1, 2))))
    box = thorax_box(lung, float(segmenter.spec.input.get("crop_margin", 0.08)))
    x, place = hu_to_network_input(hu[i : i + 1], box, segmenter.spec)
    with torch.inference_mode():
        logits = segmenter.network(x)[:, :, place.top : place.top + place.rows,
                                      place.left : place.left + place.cols]
        size = (box[0].stop - box[0].start, box[1].stop - box[1].start)
        old = F.interpolate(logits, size=size, mode="bilinear").argmax(1)[0].numpy()
    before = np.zeros(hu.shape[1:], np.uint8)
    before[box] = old.astype(np.uint8) * (lung[i][box] > 0)
    rows, cols = np.nonzero(lesion[i] | before)
    r0, c0 = max(0, rows.min() - 10), max(0, cols.min() - 10)
    zoom = (slice(r0, min(hu.shape[1], r0 + 160)), slice(c0, min(hu.shape[2], c0 + 160)))
    lower, upper = window_bounds(segmenter.spec.intensity)
    def zoomed(image: np.ndarray) -> np.ndarray:  # 2x, nearest: the pixels stay visible
        return image[zoom].repeat(2, axis=0).repeat(2, axis=1)

    grey = zoomed(hu_to_unit(hu[i], lower, upper))
    save_grid([[
        tile(overlay(grey, np.zeros_like(zoomed(lesion[i])), {}), 320, "P002 (lung window)"),
        tile(overlay(grey, zoomed(before), LESION_COLOURS), 320,
             "before: argmax of resized logits"),
        tile(overlay(grey, zoomed(lesion[i]), LESION_COLOURS), 320,
             "after: filtered, thresholded"),
    ]], out / "grid_before_after.png")
    return {"slice_index": i, "kind_changes_per_lesion_pixel_before": kind_changes(before),
            "kind_changes_per_lesion_pixel_after": kind_changes(lesion[i])}


def kind_changes(labels: np.ndarray) -> float:
    """GGO<->consolidation changes between 4-neighbours per lesion pixel (a grid: ~0.3)."""
    changes = 0
    for a, b in ((labels[..., 1:], labels[..., :-1]), (labels[..., 1:, :], labels[..., :-1, :])):
        changes += int(((a > 0) & (b > 0) & (a != b)).sum())
    return changes / max(int((labels > 0).sum()), 1)


def overlays(data: Path, segmenter: LesionSegmenter, which: dict[str, str], out: Path,
             limit: int | None) -> dict:
    """Overlay PNG of three slices per series at the shipped setting, and their volumes."""
    lower, upper = window_bounds(segmenter.spec.intensity)
    rows, volumes = [], {}
    for rel in list(which)[:limit]:
        hu, spacing, _ = read_series(data / rel)
        lung = segment_lungs(hu, spacing)
        lesion = segmenter.predict(hu, lung, spacing)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        name = Path(rel).name
        volumes[name] = {"slices": int(hu.shape[0]),
                         "lesion_ml": float((lesion > 0).sum() * voxel_ml),
                         "involvement_percent": float(100 * (lesion > 0).sum()
                                                      / max((lung > 0).sum(), 1))}
        by_area = np.argsort((lesion > 0).sum(axis=(1, 2)))
        picks = sorted({hu.shape[0] // 2, int(by_area[-1])})
        rows.append([tile(overlay(hu_to_unit(hu[i], lower, upper), lesion[i], LESION_COLOURS),
                          220, f"{name[-26:]} #{i}") for i in picks])
    save_grid(rows, out / "overlay_hu_series.png")
    return volumes


def measurement_setting(tradeoff: dict) -> tuple[float, float, float]:
    """The shipped measurement setting; when none meets the normals goal, the one with the
    least false-positive volume on the worse normal (then the best selection Dice)."""
    if tradeoff["choice"]["shipped"] is not None:
        return tuple(tradeoff["choice"]["shipped"])
    normals = [n for n, r in tradeoff["table"][0]["patients"].items() if r["label"] == "normal"]
    row = min(tradeoff["table"], key=lambda r: (
        max(r["patients"][n]["lesion_ml"] for n in normals),
        -(r["dice_selection"]["lesion"] or 0.0)))
    return tuple(row["setting"])


def evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    data, out = Path(args.data), Path(args.out or REPO / "models" / "ct-lesion")
    segmenter = LesionSegmenter.load(out)
    patients = ct_lopo.load_patients(data, segmenter, RULE, limit=args.limit)
    lopo = ct_lopo.leave_one_patient_out(patients)
    maps = ct_lopo.load_maps(data, segmenter, limit=args.limit)
    tradeoff = lesion_tradeoff.tradeoff(segmenter, data, maps, args.limit)
    setting = measurement_setting(tradeoff)
    spec = json.loads((out / "spec.json").read_text())
    spec["thresholds"] = dict(zip(lesion_tradeoff.SETTING_FIELDS, setting, strict=True))
    spec["thresholds_use"] = (
        "measurement: the lesion mask the node writes (SEG) and measures (SR volumes, percent "
        "of each lung), chosen for segmentation quality under the normals' false-positive goal "
        "(training/ct_lesion/tradeoff.py). The COVID call builds its own mask with "
        "ct-classifier's lesion_probability / min_lesion_ml (chosen leave-one-patient-out).")
    spec["output"]["postprocess"] = (
        "softmax, [1,2,2,2,1]/8 low-pass (decoder checkerboard), bilinear resize, lesion where "
        "P(GGO)+P(consolidation) >= lesion_probability, 3D lesions < min_lesion_ml or with mean "
        "lesion probability < min_mean_probability dropped")
    (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    segmenter = LesionSegmenter.load(out)  # the node's segmenter with the chosen setting
    per_patient = next(r for r in tradeoff["table"] if tuple(r["setting"]) == setting)
    metrics = {
        "model": {"name": segmenter.spec.name, "version": segmenter.spec.version,
                  "weights_sha256": segmenter.spec.weights_sha256},
        "measurement_setting": dict(zip(lesion_tradeoff.SETTING_FIELDS, setting,
                                        strict=True)),
        "test_slices_8bit": evaluate_test_slices(segmenter, data, args.limit, args.seed, out,
                                                 setting),
        "test_slices_8bit_at_0.5": evaluate_test_slices(segmenter, data, args.limit,
                                                        args.seed, None, (0.5, 0.0, 0.0)),
        "tradeoff": tradeoff,
        "real_hu": {
            "decision_setting_chosen_on_all_patients": ct_lopo.choose(patients),
            "normals_leave_one_normal_out": tradeoff["choice"]["leave_one_normal_out"],
            "goal_normal": tradeoff["goal_normal"],
            "slice_detection_auc": slice_detection(data, patients, lopo, args.seed),
            "per_patient_shipped": {
                p.name: {"label": p.label, "slices": p.slices, "lung_ml": p.lung_ml,
                         **per_patient["patients"][p.name]}
                for p in patients},
            "blocks_shipped": overlays(data, segmenter, ct_lopo.BLOCKS, out, args.limit),
            "grid": grid_before_after(data, segmenter, out),
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    test = metrics["test_slices_8bit"]
    spec = json.loads((out / "spec.json").read_text())
    spec["metrics"] = {
        "lesion_dice_pooled": test["dice_pooled"]["lesion"],
        "ggo_dice_pooled": test["dice_pooled"]["ggo"],
        "consolidation_dice_pooled": test["dice_pooled"]["consolidation"],
        "on": f"{test['n_slices']} Inf-Net test slices at the measurement setting; {LEAKAGE_NOTE}",
        "details": "metrics.json",
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    write_lesion_card(out, segmenter.spec, metrics)
    return 0
