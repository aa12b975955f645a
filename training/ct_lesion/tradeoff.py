"""The measurement mask's settings: segmentation quality against false positives on normals.

The lesion mask the node writes (SEG, SR volumes, percent of each lung) should be as close to
a radiologist's outline as it can be, while normal lungs stay nearly empty. The COVID call is a
different question with its own settings (training/common/ct_lopo.py); forcing both onto one lesion
probability chosen for the call cost the mask most of its overlap (MedSeg Dice 0.72 -> 0.21).

Every candidate (lesion probability, smallest 3D lesion, smallest mean probability of a kept
lesion) is measured on
- MedSeg slices: pooled Dice (any lesion, GGO, consolidation) on the 50 Inf-Net *training*
  slices, each predicted by the fold model that left it out (training/common/ct_folds.py), so
  the choice never sees a test slice and no selection slice judges its own model; and on the
  48 test slices with the shipped model (reported only);
- the real HU patients from cache/ct-eval (ct_lopo.lesion_maps), each through the fold model
  that did not train on it: lesion mL and involvement.

The choice (`choose_measurement`): among the settings whose false-positive volume on the
normal patients meets the goal (< 5 mL and < 0.5% of lung), the best selection Dice; each
normal patient is also judged with the setting chosen on the other normal only.
The setting shipped is the one meeting the goal on both normals. A filter must also keep at
least half of each whole-series pneumonia patient's lesion volume (`keeps_disease`).
A component's "mean probability" filter keeps a lesion only where the network is confident on
average over it, which removes faint halos around vessels without thinning real lesions.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from covid_plugin.ml.ct_lesion import (
    CONSOLIDATION,
    GGO,
    NONE,
    LesionSegmenter,
    attenuation_kind,
    filter_lesions,
    lesion_probability,
)
from covid_plugin.ml.ct_window import unit_to_hu, window_bounds
from training.common.ct_folds import FOLDS, OutOfFold, medseg_held_out
from training.common.ct_lopo import SeriesMaps
from training.ct_lesion.data import load_slices

LESION_PROBABILITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_LESION_ML = (0.0, 0.5, 1.0, 2.0, 5.0)
MIN_MEAN_PROBABILITY = (0.0, 0.8, 0.9)
SETTING_FIELDS = ("lesion_probability", "min_lesion_ml", "min_mean_probability")
GOAL_NORMAL_ML, GOAL_NORMAL_PERCENT = 5.0, 0.5
MIN_KEPT_FRACTION = 0.5
# MedSeg slices carry no spacing. The thorax crop (~360 mm) spans 256 px, so ~1.4 mm pixels;
# a slice is treated as a 5 mm slab, so min_lesion_ml acts on 2D components of a comparable
# physical size. Only the size filter depends on this assumption.
MEDSEG_SPACING = (5.0, 1.4, 1.4)


def settings() -> list[tuple[float, float, float]]:
    """Candidates; a mean-probability floor at or below the voxel threshold changes nothing."""
    return [(p, ml, m) for p, ml, m in itertools.product(
        LESION_PROBABILITIES, MIN_LESION_ML, MIN_MEAN_PROBABILITY) if m == 0.0 or m > p]


def _dice(pred: np.ndarray, true: np.ndarray) -> float | None:
    denominator = pred.sum() + true.sum()
    return float(2 * (pred & true).sum() / denominator) if denominator else None


def medseg_probabilities(segmenter: LesionSegmenter, slices: list[dict]
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lesion probability, kind, reference) of MedSeg slices, padding zeroed; the kind from
    the slice's approximate HU (the calibrated window read backwards), as the node types real
    HU, and aerated pixels no lesion."""
    x = torch.stack([s["image"] for s in slices])
    valid = torch.stack([s["valid"] for s in slices])[:, 0].numpy()
    with torch.inference_mode():
        lesion = torch.cat([lesion_probability(segmenter.network(x[i:i + 8]))
                            for i in range(0, len(x), 8)]).numpy()
    hu = unit_to_hu(x[:, 0].numpy(), *window_bounds(segmenter.spec.intensity))
    kind = attenuation_kind(hu, MEDSEG_SPACING[1], segmenter.band)
    lesion = lesion * valid * (kind != NONE)
    true = torch.stack([s["label"] for s in slices])[:, 0].long().numpy()
    return lesion, kind, true


def medseg_out_of_fold(judge: OutOfFold, slices: list[dict]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`medseg_probabilities` of the MedSeg training slices, each slice by the fold model that
    left it out (all by the shipped model when there are no fold models)."""
    parts = [medseg_probabilities(judge.for_fold(fold), held)
             for fold in FOLDS
             if (held := [s for i, s in enumerate(slices) if medseg_held_out(i, fold)])]
    order = [i for fold in FOLDS for i in range(len(slices)) if medseg_held_out(i, fold)]
    inverse = np.argsort(order)
    return tuple(np.concatenate([p[k] for p in parts])[inverse] for k in range(3))


def medseg_labels(probability: np.ndarray, kind: np.ndarray,
                  setting: tuple[float, float, float]) -> np.ndarray:
    """Labels of MedSeg slices at one setting, each slice filtered in 2D (MedSeg slices have
    no neighbours)."""
    return np.stack([
        filter_lesions(probability[i:i + 1], kind[i:i + 1], MEDSEG_SPACING, *setting)[0]
        for i in range(len(probability))])


def medseg_dice(probability: np.ndarray, kind: np.ndarray, true: np.ndarray,
                setting: tuple[float, float, float]) -> dict[str, float | None]:
    """Pooled Dice over slices at one setting (`medseg_labels`)."""
    pred = medseg_labels(probability, kind, setting)
    return {"lesion": _dice(pred > 0, true > 0), "ggo": _dice(pred == GGO, true == GGO),
            "consolidation": _dice(pred == CONSOLIDATION, true == CONSOLIDATION)}


def hu_volumes(probability: np.ndarray, kind: np.ndarray, lung: np.ndarray,
               spacing: tuple[float, float, float], setting: tuple[float, float, float]
               ) -> dict[str, float]:
    lesion = filter_lesions(probability, kind, spacing, *setting)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n = int((lesion > 0).sum())
    return {"lesion_ml": n * voxel_ml,
            "ggo_ml": int((lesion == GGO).sum()) * voxel_ml,
            "consolidation_ml": int((lesion == CONSOLIDATION).sum()) * voxel_ml,
            "involvement_percent": 100 * n / max(int((lung > 0).sum()), 1)}


def meets_goal(row: dict) -> bool:
    return row["lesion_ml"] < GOAL_NORMAL_ML and row["involvement_percent"] < GOAL_NORMAL_PERCENT


def keeps_disease(row: dict, table: list[dict]) -> bool:
    """Component filters are there to remove specks, not disease: on every whole-series patient
    with pneumonia (COVID-19 or CAP, >= 50 slices) the filtered mask keeps at least
    `MIN_KEPT_FRACTION` of the lesion volume found at the same voxel threshold unfiltered.
    (A mean-probability floor drops a confluent pneumonia whole: cap001 606 -> 5 mL at 0.6.)"""
    p = row["setting"][0]
    plain = next(r for r in table if r["setting"] == [p, 0.0, 0.0])
    return all(
        row["patients"][name]["lesion_ml"] >= MIN_KEPT_FRACTION * r["lesion_ml"]
        for name, r in plain["patients"].items()
        if r["label"] in ("covid", "pneumonia_other") and r.get("slices", 0) >= 50)


def choose_measurement(table: list[dict], normals: list[str]) -> dict:
    """The shipped setting (goal met on every normal in `normals`, disease kept, best selection
    Dice) and, per normal, the setting chosen on the other normals and what it gives that one."""
    def best(on: list[str]) -> dict | None:
        feasible = [r for r in table if keeps_disease(r, table)
                    and all(meets_goal(r["patients"][n]) for n in on)]
        if not feasible:
            return None
        # ties: the lower probability floor keeps more of the lesion
        return max(feasible, key=lambda r: (round(r["dice_selection"]["lesion"] or 0.0, 4),
                                            -r["setting"][0], -r["setting"][1]))

    held_out = {}
    for name in normals:
        chosen = best([n for n in normals if n != name])
        held_out[name] = None if chosen is None else {
            "setting": chosen["setting"], **chosen["patients"][name],
            "goal_met": meets_goal(chosen["patients"][name])}
    shipped = best(normals)
    return {"shipped": None if shipped is None else shipped["setting"],
            "leave_one_normal_out": held_out}


def tradeoff(judge: OutOfFold, data: Path, patients: dict[str, SeriesMaps],
             test: tuple[np.ndarray, np.ndarray, np.ndarray], limit: int | None = None) -> dict:
    """The whole table; `patients` judged out of fold (ct_lopo.load_maps with `judge`), `test`
    the shipped model's `medseg_probabilities` of the test slices (reported, never chosen on)."""
    selection = medseg_out_of_fold(judge, load_slices(data, "train", limit))
    table = []
    for setting in settings():
        table.append({
            "setting": list(setting),
            "dice_selection": medseg_dice(*selection, setting),
            "dice_test": medseg_dice(*test, setting),
            "patients": {name: {"label": m.label, "slices": int(m.lung.shape[0]),
                                **hu_volumes(m.probability, m.kind, m.lung, m.spacing, setting)}
                         for name, m in patients.items()},
        })
    normals = [n for n, m in patients.items() if m.label == "normal"]
    return {"table": table, "choice": choose_measurement(table, normals),
            "medseg_spacing_assumed": list(MEDSEG_SPACING),
            "out_of_fold": judge.complete,
            "setting_fields": list(SETTING_FIELDS),
            "disease_kept_fraction_at_least": MIN_KEPT_FRACTION,
            "goal_normal": {"lesion_ml_below": GOAL_NORMAL_ML,
                            "involvement_percent_below": GOAL_NORMAL_PERCENT}}

