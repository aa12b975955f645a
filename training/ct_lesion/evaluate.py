"""Evaluate the CT lesion network: `python -m training evaluate ct-lesion`.

No figure has seen its own patient (training/common/ct_folds.py): each COVID-CT-MD patient and
each MedSeg training slice is judged by the fold model that left it out; the MedSeg test
slices, which no model trained on, by the shipped model. Kinds of evidence, kept apart in
metrics.json, and the goals under `headline`:
- the measurement setting (the mask the node writes and measures), chosen by
  training/ct_lesion/tradeoff.py on out-of-fold MedSeg training slices and normal chests;
- Dice/IoU of the shipped model on the 48 MedSeg test slices at that setting (8-bit, no
  patient ids: the same patient may sit in training, so optimistic);
- every normal chest's false lesion volume, out of fold;
- slice-level infection AUC against the radiologists' labels, out of fold, CI by patient;
- the mean HU of what is called consolidation (it must be dense: >= -300 HU);
- the node's own path on dicom_samples (lesion on the normal CT, consolidation HU on COVID).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot

from covid_plugin.ml.ct_lesion import CONSOLIDATION, GGO, LesionSegmenter, filter_lesions
from covid_plugin.ml.ct_lung import segment_lungs
from covid_plugin.ml.ct_window import hu_to_unit, window_bounds
from covid_plugin.ml.spec import CtLesionSpec, CtLesionThresholds, load_spec, save_spec
from covid_plugin.volume import load_series_files
from training.common import ct_lopo
from training.common.ct_folds import FOLD_ROOT, OutOfFold
from training.common.ct_lopo import SeriesMaps
from training.common.ct_plots import LESION_COLOURS, overlay, save_grid, tile
from training.common.ct_series import read_series, series_slice_labels
from training.common.metrics import bootstrap_auc
from training.common.paths import REPO
from training.ct_lesion import tradeoff as lesion_tradeoff
from training.ct_lesion.card import write_lesion_card
from training.ct_lesion.data import load_slices
from training.ct_lesion.tradeoff import medseg_labels, medseg_probabilities

SAMPLES = REPO / "dicom_samples"
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


def evaluate_test_slices(slices: list[dict], found: tuple[np.ndarray, ...], seed: int,
                         out: Path | None, setting: tuple[float, float, float]) -> dict:
    """Dice/IoU of the MedSeg test `slices` at one measurement setting (probability, smallest
    lesion, smallest mean probability) from their `found` (probability, kind, reference) of
    `tradeoff.medseg_probabilities`, each slice filtered in 2D as `tradeoff.py` does; the
    overlay picture when `out` is given."""
    probability, kind, reference = found
    pred = torch.from_numpy(medseg_labels(probability, kind, setting))[:, None].long()
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


def slice_auc(maps: dict[str, SeriesMaps], labels: dict[str, dict[float, int]],
              setting: tuple[float, float, float], seed: int) -> dict:
    """Per-slice AUC of the lesion mL at `setting` against the radiologists' infection label,
    over the labelled (non-normal) COVID-CT-MD patients, each judged out of fold."""
    y, score, groups = [], [], []
    for name, m in maps.items():
        if m.label == "normal" or name not in labels:
            continue
        lesion = filter_lesions(m.probability, m.kind, m.spacing, *setting)
        voxel_ml = float(np.prod(m.spacing)) / 1000.0
        for z, count in zip(m.positions_z, (lesion > 0).sum(axis=(1, 2)), strict=True):
            y.append(labels[name][round(z, 1)])
            score.append(count * voxel_ml)
            groups.append(name)
    result = bootstrap_auc(np.array(y), np.array(score), np.array(groups), seed=seed)
    return {**result, "patients": sorted(set(groups)),
            "note": "score = predicted lesion mL per slice (4 mm slices, whole chest), label = "
                    "radiologists' slice infection label; each patient by the lesion model that "
                    "did not train on it; CI by patient bootstrap over 4 patients, each with both "
                    "labels: it understates how much the AUC differs between patients"}


def consolidation_hu(lesion: np.ndarray, hu: np.ndarray) -> float | None:
    """Mean HU of the voxels labelled consolidation (None when there are none)."""
    dense = lesion == CONSOLIDATION
    return float(hu[dense].mean()) if dense.any() else None


def node_samples(segmenter: LesionSegmenter) -> dict:
    """The shipped model on dicom_samples through the node's loader and path."""
    found = {}
    for folder in sorted(SAMPLES.glob("ct-*")):
        series = load_series_files(sorted(folder.glob("*.dcm")))
        lung = segment_lungs(series.array, series.spacing, series.orientation)
        lesion = segmenter.predict(series.array, lung, series.spacing)
        voxel_ml = float(np.prod(series.spacing)) / 1000.0
        found[folder.name] = {
            "lesion_ml": float((lesion > 0).sum() * voxel_ml),
            "ggo_ml": float((lesion == GGO).sum() * voxel_ml),
            "consolidation_ml": float((lesion == CONSOLIDATION).sum() * voxel_ml),
            "consolidation_mean_hu": consolidation_hu(lesion, series.array)}
    return found


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


def options(extra: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training evaluate ct-lesion")
    parser.add_argument("--folds", type=Path, default=FOLD_ROOT,
                        help="folder of the fold models (fold-A, fold-B)")
    return parser.parse_args(list(extra))


def headline(tradeoff: dict, setting: tuple[float, float, float], test: dict,
             maps: dict[str, SeriesMaps], samples: dict, auc: dict, complete: bool) -> dict:
    """The issue's goals, each with the figure that judges it."""
    row = next(r for r in tradeoff["table"] if tuple(r["setting"]) == setting)
    normals = {n: r["lesion_ml"] for n, r in row["patients"].items() if r["label"] == "normal"}
    dense = {}
    for name, m in maps.items():
        if m.label in ("covid", "pneumonia_other"):
            dense[name] = consolidation_hu(
                filter_lesions(m.probability, m.kind, m.spacing, *setting), m.hu)
    dense.update({name: r["consolidation_mean_hu"] for name, r in samples.items()
                  if "covid" in name.split("_")[0]})
    covid_dense = [v for n, v in dense.items()
                   if v is not None and (maps[n].label == "covid" if n in maps else True)]
    normal_sample = next((r["lesion_ml"] for n, r in samples.items() if "normal" in n), None)
    dice = test["dice_pooled"]["lesion"]
    return {
        "medseg_test_dice_lesion": dice,
        "medseg_test_dice_lesion_ci95": test["dice_pooled"]["lesion_ci95_slice_bootstrap"],
        "normals_false_lesion_ml": normals,
        "slice_auc_lopo": {"auc": auc["auc"], "ci95": auc["ci95"], "n_slices": auc["n"],
                           "patients": auc["patients"]},
        "consolidation_mean_hu": dense,
        "node_samples": samples,
        "out_of_fold": complete,
        "goals": {
            "medseg_test_dice_lesion >= 0.60": dice is not None and dice >= 0.60,
            "every normal < 5 mL": all(v < 5.0 for v in normals.values()) and bool(normals),
            "consolidation on COVID >= -300 HU": all(v >= -300 for v in covid_dense),
            "node: normal sample < 5 mL": normal_sample is not None and normal_sample < 5.0,
        },
    }


def evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    opts = options(args.extra)
    data, out = Path(args.data), Path(args.out or REPO / "models" / "ct-lesion")
    judge = OutOfFold(out, opts.folds)
    maps = ct_lopo.load_maps(data, judge.for_series, limit=args.limit)
    slices = load_slices(data, "test", args.limit)
    # one network pass over the test slices: the probabilities do not depend on the setting
    found = medseg_probabilities(judge.for_fold("all"), slices)
    tradeoff = lesion_tradeoff.tradeoff(judge, data, maps, found, args.limit)
    setting = measurement_setting(tradeoff)
    save_spec(out, load_spec(out, CtLesionSpec).model_copy(update={
        "thresholds": CtLesionThresholds.model_validate(
            dict(zip(lesion_tradeoff.SETTING_FIELDS, setting, strict=True))),
        "thresholds_use": (
            "measurement: the lesion mask the node writes (SEG) and measures (SR volumes, "
            "percent of each lung), chosen out of fold for segmentation quality under the "
            "normals' false-positive goal (training/ct_lesion/tradeoff.py). The COVID call "
            "builds its own mask with ct-classifier's lesion_probability / min_lesion_ml "
            "(chosen leave-one-patient-out)."),
    }))
    segmenter = LesionSegmenter.load(out)  # the node's segmenter with the chosen setting
    per_patient = next(r for r in tradeoff["table"] if tuple(r["setting"]) == setting)
    test = evaluate_test_slices(slices, found, args.seed, out, setting)
    samples = node_samples(segmenter) if args.limit is None else {}
    auc = slice_auc(maps, series_slice_labels(data), setting, args.seed)
    metrics = {
        "model": {"name": segmenter.spec.name, "version": segmenter.spec.version,
                  "weights_sha256": segmenter.spec.weights_sha256},
        "headline": headline(tradeoff, setting, test, maps, samples, auc, judge.complete),
        "measurement_setting": dict(zip(lesion_tradeoff.SETTING_FIELDS, setting,
                                        strict=True)),
        "test_slices_8bit": test,
        "test_slices_8bit_at_0.5": evaluate_test_slices(slices, found, args.seed, None,
                                                        (0.5, 0.0, 0.0)),
        "tradeoff": tradeoff,
        "real_hu": {
            "normals_leave_one_normal_out": tradeoff["choice"]["leave_one_normal_out"],
            "goal_normal": tradeoff["goal_normal"],
            "per_patient_out_of_fold": per_patient["patients"],
            "blocks_shipped": overlays(data, segmenter, ct_lopo.BLOCKS, out, args.limit),
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_spec(out, segmenter.spec.model_copy(update={"metrics": {
        "lesion_dice_pooled": test["dice_pooled"]["lesion"],
        "ggo_dice_pooled": test["dice_pooled"]["ggo"],
        "consolidation_dice_pooled": test["dice_pooled"]["consolidation"],
        "on": f"{test['n_slices']} Inf-Net test slices at the measurement setting; {LEAKAGE_NOTE}",
        "details": "metrics.json",
    }}))
    write_lesion_card(out, segmenter.spec, metrics)
    return 0
