"""The rule-based CT lung segmentation as a model folder: `python -m training evaluate ct-lung`.

There is nothing to fit (no lung masks exist in the shared data), so `train` writes the spec
of the rule (covid_plugin/ml/ct_lung.py, weights null) and `evaluate` checks it on every real
HU series: volumes in mL, both lungs found, left/right on the expected image side, run time,
and overlay PNGs for the card.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from covid_plugin.ml.ct_lung import lung_volumes_ml, segment_lungs
from covid_plugin.ml.ct_window import hu_to_unit
from covid_plugin.ml.spec import CtLungSpec, load_spec, save_spec
from training.common.ct_plots import LUNG_COLOURS, overlay, save_grid, tile
from training.common.ct_series import FULL_SERIES, HU_SERIES, load_hu_series
from training.common.paths import REPO
from training.ct_lung.card import write_lung_card

DISPLAY_WINDOW = (-1350.0, 150.0)  # a lung window for the overlays only
# plausible adult lung volume per mm of craniocaudal extent through the mid/lower chest (mL/mm)
PLAUSIBLE_ML_PER_MM = (5.0, 40.0)
AIRWAY_CHECK_MM = 30.0  # lumen (< -950 HU) this close to the midline: trachea, main bronchi
# the same voxels stored another way: (array flips (slices, rows, cols), ImageOrientationPatient)
STORAGE_VARIANTS = {
    "mirrored_columns": ((True, False, True), (-1, 0, 0, 0, 1, 0)),
    "mirrored_rows": ((True, True, False), (1, 0, 0, 0, -1, 0)),
    "prone": ((False, True, True), (-1, 0, 0, 0, -1, 0)),
}


def airway_as_lung_ml(hu: np.ndarray, labels: np.ndarray, spacing) -> float:
    """mL of airway lumen labelled lung: 3D pieces (>= 0.5 mL) of air-dense voxels (< -950 HU)
    within AIRWAY_CHECK_MM of the midline between the lungs, i.e. the trachea and main bronchi
    (single noisy lung voxels below -950 HU are not pieces of that size). Should be 0."""
    cols = np.flatnonzero((labels > 0).any(axis=(0, 1)))
    if cols.size == 0:
        return 0.0
    midline = (cols[0] + cols[-1]) / 2
    central = np.abs(np.arange(hu.shape[2]) - midline) < AIRWAY_CHECK_MM / spacing[2]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pieces, n = ndi.label((hu < -950) & central)
    big = np.bincount(pieces.ravel(), minlength=n + 1) * voxel_ml >= 0.5
    big[0] = False
    return float(((labels > 0) & big[pieces]).sum() * voxel_ml)


def storage_check(hu: np.ndarray, spacing, reference: dict[str, float]) -> dict[str, dict]:
    """Right/left volumes when the series is stored mirrored or prone (same patient positions)."""
    out = {}
    for name, (flips, orientation) in STORAGE_VARIANTS.items():
        index = tuple(slice(None, None, -1 if flip else None) for flip in flips)
        labels = segment_lungs(np.ascontiguousarray(hu[index]), spacing, orientation)
        volumes = lung_volumes_ml(labels, spacing)
        out[name] = {
            "right_ml": volumes["right_ml"], "left_ml": volumes["left_ml"],
            "same_sides": bool(abs(volumes["right_ml"] - reference["right_ml"])
                               <= 0.01 * reference["right_ml"]
                               and abs(volumes["left_ml"] - reference["left_ml"])
                               <= 0.01 * reference["left_ml"]),
        }
    return out

def _first(folders: dict[str, str], limit: int | None) -> dict[str, str]:
    return dict(list(folders.items())[:limit])


def evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    data, out = Path(args.data), Path(args.out or REPO / "models" / "ct-lung")
    # the limit picks folders before any is read (each is a full HU volume)
    series_list = [*load_hu_series(data, which=_first(HU_SERIES, args.limit)),
                   *load_hu_series(data, which=_first(FULL_SERIES, args.limit))]
    results, rows = {}, []
    for series in series_list:
        start = time.perf_counter()
        labels = segment_lungs(series.hu, series.spacing)
        seconds = time.perf_counter() - start
        volumes = lung_volumes_ml(labels, series.spacing)
        extent_mm = series.hu.shape[0] * series.spacing[0]
        cols = [np.nonzero(labels == v)[2].mean() if (labels == v).any() else None for v in (1, 2)]
        per_mm = volumes["total_ml"] / extent_mm
        results[series.name] = {
            "label": series.label,
            "slices": int(series.hu.shape[0]),
            "spacing_mm": list(series.spacing),
            "craniocaudal_extent_mm": extent_mm,
            **volumes,
            "ml_per_mm": per_mm,
            "plausible": bool(PLAUSIBLE_ML_PER_MM[0] <= per_mm <= PLAUSIBLE_ML_PER_MM[1]),
            "two_lungs": bool(volumes["right_ml"] > 0 and volumes["left_ml"] > 0),
            "right_lung_on_image_left": bool(cols[0] is not None and cols[1] is not None
                                             and cols[0] < cols[1]),
            "airway_labelled_lung_ml": airway_as_lung_ml(series.hu, labels, series.spacing),
            "seconds": seconds,
        }
        if series.name == "normal002":  # whole chest: stored mirrored and prone, same sides?
            results[series.name]["storage"] = storage_check(series.hu, series.spacing, volumes)
        picks = sorted({0, series.hu.shape[0] // 2, series.hu.shape[0] - 1})
        rows.append([
            tile(overlay(hu_to_unit(series.hu[i], *DISPLAY_WINDOW), labels[i], LUNG_COLOURS),
                 220, f"{series.name[-26:]} #{i}")
            for i in picks
        ])
    save_grid(rows, out / "overlay_lungs.png")
    metrics = {
        "model": {"name": "ct-lung", "version": "1.0.0", "weights_sha256": None},
        "note": "no reference lung masks exist here: plausibility checks, not Dice. Partial "
                "series (14-60 slices) hold part of the lungs, so volumes are per block; "
                "ml_per_mm compares blocks of different extent",
        "plausible_ml_per_mm": list(PLAUSIBLE_ML_PER_MM),
        "per_series": results,
        "all_plausible": all(r["plausible"] for r in results.values()),
        "all_two_lungs": all(r["two_lungs"] for r in results.values()),
        "all_right_on_image_left": all(r["right_lung_on_image_left"] for r in results.values()),
        "max_airway_labelled_lung_ml": max(r["airway_labelled_lung_ml"]
                                           for r in results.values()),
        "storage_variants_same_sides": all(v["same_sides"] for r in results.values()
                                           for v in r.get("storage", {}).values()),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    summary = {key: metrics[key] for key in ("all_plausible", "all_two_lungs",
                                             "all_right_on_image_left",
                                             "max_airway_labelled_lung_ml",
                                             "storage_variants_same_sides")}
    summary["on"] = f"{len(results)} real HU series; details in metrics.json"
    spec = load_spec(out, CtLungSpec)
    save_spec(out, spec.model_copy(update={"metrics": summary}))
    write_lung_card(out, metrics)
    return 0
