"""Every CT threshold chosen leave-one-patient-out on the real HU patients.

The node's CT decision has three numbers that were not fixed a priori: the lesion probability
a voxel needs (`lesion_probability`) and the smallest 3D lesion kept (`min_lesion_ml`) in the
mask the rule's features are computed on, and the score the series-level rule needs to call
COVID-19 (`decision`), all three in ct-classifier/spec.json. (The mask the node writes and
measures has its own setting, chosen for segmentation quality: training/ct_lesion/tradeoff.py.)
With eleven patients there is no separate validation set, so each is
chosen on the other patients only (`choose`), and the held-out patient is judged with what was
chosen without it (`leave_one_patient_out`). The values shipped are `choose` on all patients.

The per-patient work (lungs from HU, lesion probabilities through the node's own path) is
done once per patient and kept in cache/ct-eval/, keyed by the lung code and lesion weights.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covid_plugin.ml import ct_lesion, ct_lung
from covid_plugin.ml.ct_cls import lesion_features, peripheral_zone, rule_score
from covid_plugin.ml.ct_lesion import LesionSegmenter, filter_lesions
from covid_plugin.ml.spec import CtRuleThresholds
from training.common.ct_series import FULL_SERIES, HuSeries, read_series
from training.common.paths import REPO

log = logging.getLogger(__name__)

Judge = Callable[[str], LesionSegmenter]  # series folder name -> the segmenter that judges it

CACHE = REPO / "cache" / "ct-eval"

# one series per patient (the whole-chest series where there is one), and its label
# The COVID-19-NY-SBU single axial slices are not here: the node refuses to score a one-slice
# "series" (too few slices), so a figure that counted them described calls it never makes.
PATIENTS = {  # the small series first, so that `--limit 2` (tests) is quick and has both classes
    "ct_hu/dicom/tcia-lung-pet-ct-dx_Lung_Dx-A0002": "lung_cancer",
    "ct_hu/covid-ct-md-series/P002": "covid",
    "ct_hu/dicom/tcia-lung-pet-ct-dx_Lung_Dx-A0001": "lung_cancer",
    "dicom/tcia-rider-pilot_0117_chest-ct-nsclc": "lung_cancer",
    **{rel: label for rel, label in FULL_SERIES.items() if not rel.endswith("/P002")},
}
# 30-slice 2 mm blocks of patients above (and the normal block is the dicom_samples series)
BLOCKS = {
    "ct_hu/dicom/covid-ct-md_P002": "covid",
    "ct_hu/dicom/covid-ct-md_cap002": "pneumonia_other",
    "ct_hu/dicom/covid-ct-md_normal002": "normal",
}

LESION_PROBABILITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_LESION_ML = (0.0, 0.1, 0.5, 1.0)
NORMAL_FALSE_LESION_ML = 5.0  # the measurement mask's goal on normal chests (tradeoff.py)


@dataclass
class Patient:
    """One series through the node's CT path at every candidate lesion setting."""

    name: str
    label: str
    slices: int
    lung_ml: float
    # (lesion_probability, min_lesion_ml) -> features, volumes, score and per-slice lesion mL
    settings: dict[tuple[float, float], dict] = field(default_factory=dict)

    @property
    def covid(self) -> bool:
        return self.label == "covid"


def _cache_key(segmenter: LesionSegmenter, rel: str) -> str:
    # the node's code that turns a series into lesion probabilities: lungs, then the network's
    # pre- and post-processing (crop, window, resize, softmax, attenuation kinds)
    code = Path(ct_lung.__file__).read_bytes() + Path(ct_lesion.__file__).read_bytes()
    digest = hashlib.sha256(code + segmenter.spec.weights_sha256.encode()
                            + repr(segmenter.band).encode() + rel.encode())
    return digest.hexdigest()[:16]


def lesion_maps(data: Path, rel: str, segmenter: LesionSegmenter
                ) -> tuple[HuSeries, np.ndarray, np.ndarray, np.ndarray]:
    """(series, lung labels, lesion probability, lesion kind), cached."""
    hu, spacing, z = read_series(data / rel)
    series = HuSeries(Path(rel).name, "", hu, spacing, z)
    path = CACHE / f"{Path(rel).name}-{_cache_key(segmenter, rel)}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return series, cached["lung"], cached["probability"], cached["kind"]
    lung = ct_lung.segment_lungs(hu, spacing)
    probability, kind = segmenter.predict_probabilities(hu, lung, spacing)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, lung=lung, probability=probability, kind=kind)
    return series, lung, probability, kind


def analyse(data: Path, rel: str, label: str, segmenter: LesionSegmenter,
            rule: CtRuleThresholds) -> Patient:
    """A patient's features and rule score at every (lesion_probability, min_lesion_ml)."""
    series, lung, probability, kind = lesion_maps(data, rel, segmenter)
    voxel_ml = float(np.prod(series.spacing)) / 1000.0
    patient = Patient(series.name, label, int(series.hu.shape[0]),
                      float((lung > 0).sum() * voxel_ml))
    peripheral = np.stack([peripheral_zone(s, series.spacing, rule.peripheral_mm)
                           for s in lung])
    for threshold, min_ml in itertools.product(LESION_PROBABILITIES, MIN_LESION_ML):
        lesion = filter_lesions(probability, kind, series.spacing, threshold, min_ml)
        features = lesion_features(lung, lesion, series.spacing, rule.peripheral_mm,
                                   peripheral)
        patient.settings[(threshold, min_ml)] = {
            **features,
            "score": rule_score(features, rule),
            "lesion_ml": float((lesion > 0).sum() * voxel_ml),
            "ggo_ml": float((lesion == 1).sum() * voxel_ml),
            "consolidation_ml": float((lesion == 2).sum() * voxel_ml),
            "slice_ml": ((lesion > 0).sum(axis=(1, 2)) * voxel_ml).tolist(),
            "positions_z": series.positions_z,
        }
    log.info("%s: %d slices, lung %.0f mL", series.name, patient.slices, patient.lung_ml)
    return patient


def _best_threshold(y: np.ndarray, score: np.ndarray) -> tuple[float, float, float]:
    """(balanced accuracy, margin, decision threshold) maximising balanced accuracy.

    Candidates are the midpoints between distinct scores (and just above the top score);
    among equals the one with the widest gap to the nearest score wins.
    """
    values = np.unique(score)
    candidates = np.concatenate([(values[:-1] + values[1:]) / 2, [values[-1] + 1e-3]])
    best = (-1.0, -1.0, 0.5)
    for t in candidates:
        called = score >= t
        sens = (called & y).sum() / max(y.sum(), 1)
        spec = (~called & ~y).sum() / max((~y).sum(), 1)
        margin = float(np.min(np.abs(score - t)))
        best = max(best, (float((sens + spec) / 2), margin, float(t)))
    return best


def keeps_normals_clean(patients: list[Patient]) -> list[tuple[float, float]]:
    """The lesion settings under which every normal patient among `patients` carries less
    than `NORMAL_FALSE_LESION_ML` of lesion (all settings when none does, or no normals)."""
    normals = [p for p in patients if p.label == "normal"]
    settings = list(itertools.product(LESION_PROBABILITIES, MIN_LESION_ML))
    clean = [s for s in settings
             if all(p.settings[s]["lesion_ml"] < NORMAL_FALSE_LESION_ML for p in normals)]
    return clean or settings


def choose(patients: list[Patient]) -> dict[str, float]:
    """The lesion setting and decision threshold with the best balanced accuracy on `patients`.

    Only lesion settings that keep the normal patients' lungs clean compete
    (`keeps_normals_clean`): the call's mask obeys the goal the measured mask obeys, otherwise
    a decision a hair above zero separates the few patients it was chosen on while a normal
    chest's scattered false lesion crosses it. Ties go to the wider margin, then to the
    stricter lesion setting (fewer false-positive voxels for the same separation).
    """
    if not patients:  # nothing to choose on (a one-patient smoke run): the network's own 0.5
        return {"lesion_probability": 0.5, "min_lesion_ml": 0.0, "decision": 0.5}
    y = np.array([p.covid for p in patients])
    ranked = []
    for setting in keeps_normals_clean(patients):
        score = np.array([p.settings[setting]["score"] for p in patients])
        accuracy, margin, decision = _best_threshold(y, score)
        ranked.append(((accuracy, margin, setting[0], setting[1]), setting, decision))
    _, (threshold, min_ml), decision = max(ranked)
    return {"lesion_probability": threshold, "min_lesion_ml": min_ml, "decision": decision}


def leave_one_patient_out(patients: list[Patient]) -> list[dict]:
    """Per held-out patient: the thresholds chosen on the others and what they give it."""
    rows = []
    for held_out in patients:
        chosen = choose([p for p in patients if p is not held_out])
        result = held_out.settings[(chosen["lesion_probability"], chosen["min_lesion_ml"])]
        rows.append({
            "patient": held_out.name, "label": held_out.label, "covid": held_out.covid,
            "chosen": chosen, "score": result["score"],
            "called_covid": result["score"] >= chosen["decision"],
            "lesion_ml": result["lesion_ml"],
            "involvement_percent": result["involvement_percent"],
        })
    return rows


@dataclass
class SeriesMaps:
    """One series' lungs and lesion probabilities, with the HU they were computed from."""

    name: str
    label: str
    lung: np.ndarray
    probability: np.ndarray  # float32, 0 outside the lungs and where HU is aerated
    kind: np.ndarray  # uint8 1 GGO / 2 consolidation by attenuation, 0 outside the lungs
    spacing: tuple[float, float, float]
    hu: np.ndarray
    positions_z: list[float]


def load_maps(data: Path, judge: Judge, limit: int | None = None,
              which: dict[str, str] | None = None) -> dict[str, SeriesMaps]:
    """Every series' maps from the cache, each through `judge(name)`'s segmenter."""
    maps = {}
    for rel, label in list((which or PATIENTS).items())[:limit]:
        if (data / rel).is_dir():
            series, lung, probability, kind = lesion_maps(data, rel, judge(Path(rel).name))
            maps[series.name] = SeriesMaps(series.name, label, lung,
                                           probability.astype(np.float32), kind, series.spacing,
                                           series.hu, series.positions_z)
    return maps


def load_patients(data: Path, judge: Judge, rule: CtRuleThresholds,
                  which: dict[str, str] | None = None, limit: int | None = None
                  ) -> list[Patient]:
    """Every patient through `judge(name)`'s segmenter (training/common/ct_folds.py: the
    lesion model that never trained on that patient)."""
    return [analyse(data, rel, label, judge(Path(rel).name), rule)
            for rel, label in list((which or PATIENTS).items())[:limit]
            if (data / rel).is_dir()]
