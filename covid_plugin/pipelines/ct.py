"""Chest CT: lungs and lesions over the whole series, volumes, involvement, COVID-19 or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from covid_plugin.findings import (
    LEFT_LUNG,
    RIGHT_LUNG,
    Classification,
    ClassProbability,
    Code,
    Findings,
    Mask,
    Measurement,
)
from covid_plugin.ml.ct_cls import CtClassifier
from covid_plugin.ml.ct_lesion import LesionSegmenter
from covid_plugin.ml.ct_lung import segment_lungs
from covid_plugin.ml.spec import CtLungSpec, load_spec
from covid_plugin.pipelines import codes
from covid_plugin.pipelines.interface import SeriesSkipped
from covid_plugin.volume import LoadedSeries, irregular_grid, spill_to_disk

RIGHT, LEFT = 1, 2  # ct_lung labels
GGO, CONSOLIDATION = 1, 2  # ct_lesion labels
MIN_LUNG_ML = 100.0  # a few slices through the lung bases already hold more


class CtPipeline:
    name = "ct"
    modalities = ("CT",)

    def __init__(self, batch_size: int = 4) -> None:
        self.batch_size = batch_size  # axial slices per lesion-network forward pass

    def load_models(self, models_dir: Path, device: str) -> dict[str, Any]:
        """`device` "auto" runs the lesion network on CUDA when torch sees a GPU."""
        return {
            "lung_spec": load_spec(models_dir / "ct-lung", CtLungSpec),
            "lesions": LesionSegmenter.load(models_dir / "ct-lesion", device, self.batch_size),
            "classifier": CtClassifier.load(models_dir / "ct-classifier"),
        }

    def run(self, series: LoadedSeries, models: dict[str, Any]) -> Findings:
        if (irregular := irregular_grid(series)) is not None:
            raise SeriesSkipped(irregular)
        hu, spacing = series.array, series.spacing
        lung = segment_lungs(hu, spacing, series.orientation)
        lung_ml = float(np.prod(spacing)) / 1000.0 * np.count_nonzero(lung)
        if lung_ml < MIN_LUNG_ML:
            # the classifier's score means nothing without lungs to put lesions in
            raise SeriesSkipped(f"lungs not found ({lung_ml:.0f} mL segmented, needs "
                                f"{MIN_LUNG_ML:.0f}): not a CT through the chest")
        classifier: CtClassifier = models["classifier"]
        # two masks from one network pass: the decision's (its own LOPO-chosen setting, for the
        # call) and the measurement one (SEG, volumes, percent involved)
        segmenter: LesionSegmenter = models["lesions"]
        lesion_probabilities = segmenter.infer(hu, lung, spacing)
        del hu
        spill_to_disk(series)  # the HU volume is done with: the masks need that memory
        lesion, decided = segmenter.masks(lesion_probabilities, spacing, classifier.lesion_setting)
        del lesion_probabilities
        scores = classifier.predict(lung, lesion if decided is None else decided, spacing)
        del decided
        lung_model = models["lung_spec"].info()
        lesion_model = models["lesions"].spec.info()
        cls_model = classifier.spec.info()
        threshold = classifier.spec.thresholds.decision
        probabilities = [ClassProbability(k, classifier.spec.label(k).code(), p)
                         for k, p in scores.items()]
        predicted = "covid" if scores["covid"] >= threshold else "non_covid"

        found = measurements(lung, lesion, spacing)
        # Boolean masks without full-volume copies: the right lung takes over the memory of
        # the lung labels, and the lesion masks are zero volumes written only on the slices
        # that hold a lesion (np.zeros pages take memory only when written; a 600-slice mask
        # is 157 MB).
        lung_left = np.equal(lung, LEFT)
        lung_right = lung.view(bool)
        np.equal(lung, RIGHT, out=lung_right)
        del lung
        ggo = np.zeros(lesion.shape, bool)
        consolidation = np.zeros(lesion.shape, bool)
        for i in np.flatnonzero(lesion.any(axis=(1, 2))):
            np.equal(lesion[i], GGO, out=ggo[i])
            np.equal(lesion[i], CONSOLIDATION, out=consolidation[i])
        del lesion
        masks = [
            Mask("lung_right", "Right lung", codes.ANATOMICAL_STRUCTURE, RIGHT_LUNG,
                 lung_right, lung_model),
            Mask("lung_left", "Left lung", codes.ANATOMICAL_STRUCTURE, LEFT_LUNG,
                 lung_left, lung_model),
            Mask("ggo", "Ground glass opacity", codes.MORPHOLOGICALLY_ABNORMAL,
                 codes.GROUND_GLASS, ggo, lesion_model, anatomic_region=codes.LUNG),
            Mask("consolidation", "Consolidation", codes.MORPHOLOGICALLY_ABNORMAL,
                 codes.CONSOLIDATION, consolidation, lesion_model,
                 anatomic_region=codes.LUNG),
        ]
        return Findings(
            kind="ct",
            series_instance_uid=series.series_instance_uid,
            classification=Classification(cls_model, probabilities, predicted, threshold),
            masks=masks,
            measurements=found,
            models=[lung_model, lesion_model, cls_model],
        )


def measurements(lung: np.ndarray, lesion: np.ndarray,
                 spacing: tuple[float, float, float]) -> list[Measurement]:
    """Volumes in mL per segment, and percent of each lung (and both) involved by lesions.

    Voxels are counted slice by slice: whole-volume comparisons of a 600-slice CT take 157 MB
    each, and the percentages alone needed five of them at once.
    """
    counts = _voxel_counts(lung, lesion)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ml = codes.MILLILITER
    out = [
        Measurement(codes.VOLUME, voxel_ml * counts["lung_right"], ml, "lung_right",
                    RIGHT_LUNG),
        Measurement(codes.VOLUME, voxel_ml * counts["lung_left"], ml, "lung_left",
                    LEFT_LUNG),
        Measurement(codes.VOLUME, voxel_ml * counts["ggo"], ml, "ggo", codes.LUNG),
        Measurement(codes.VOLUME, voxel_ml * counts["consolidation"], ml, "consolidation",
                    codes.LUNG),
    ]
    sides: list[tuple[str, Code]] = [("lung_right", RIGHT_LUNG),
                                     ("lung_left", LEFT_LUNG)]
    for key, site in sides:
        total = counts[key]
        percent = 100.0 * counts[f"{key}_involved"] / total if total else 0.0
        out.append(Measurement(codes.PERCENT_INVOLVED, percent, codes.PERCENT, key, site))
    both = counts["lung"]
    percent = 100.0 * counts["lung_involved"] / both if both else 0.0
    out.append(Measurement(codes.PERCENT_INVOLVED, percent, codes.PERCENT, None, codes.LUNG))
    return out


def _voxel_counts(lung: np.ndarray, lesion: np.ndarray) -> dict[str, int]:
    """Voxels per lung and lesion label, and lesion voxels inside each lung and both."""
    counts = dict.fromkeys(("lung_right", "lung_left", "ggo", "consolidation", "lung",
                            "lung_right_involved", "lung_left_involved", "lung_involved"), 0)
    for lung_slice, lesion_slice in zip(lung, lesion, strict=True):
        involved = lesion_slice > 0
        for key, value in (("lung_right", RIGHT), ("lung_left", LEFT)):
            side = lung_slice == value
            counts[key] += int(np.count_nonzero(side))
            counts[f"{key}_involved"] += int(np.count_nonzero(involved & side))
        counts["ggo"] += int(np.count_nonzero(lesion_slice == GGO))
        counts["consolidation"] += int(np.count_nonzero(lesion_slice == CONSOLIDATION))
        in_lung = lung_slice > 0
        counts["lung"] += int(np.count_nonzero(in_lung))
        counts["lung_involved"] += int(np.count_nonzero(involved & in_lung))
    return counts
