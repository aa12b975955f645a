"""Chest CT: lungs and lesions over the whole series, volumes, involvement, COVID-19 or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from covid_plugin.findings import (
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
from covid_plugin.ml.spec import load_spec
from covid_plugin.pipelines import codes
from covid_plugin.volume import LoadedSeries
from covid_plugin.worker import SeriesSkipped

RIGHT, LEFT = 1, 2  # ct_lung labels
GGO, CONSOLIDATION = 1, 2  # ct_lesion labels
MIN_LUNG_ML = 100.0  # a few slices through the lung bases already hold more


class CtPipeline:
    name = "ct"
    modalities = ("CT",)

    def load_models(self, models_dir: Path, device: str) -> dict[str, Any]:
        return {
            "lung_spec": load_spec(models_dir / "ct-lung"),
            "lesions": LesionSegmenter.load(models_dir / "ct-lesion"),
            "classifier": CtClassifier.load(models_dir / "ct-classifier"),
        }

    def run(self, series: LoadedSeries, models: dict[str, Any]) -> Findings:
        hu, spacing = series.array, series.spacing
        lung = segment_lungs(hu, spacing)
        lung_ml = float(np.prod(spacing)) / 1000.0 * int((lung > 0).sum())
        if lung_ml < MIN_LUNG_ML:
            # the classifier's score means nothing without lungs to put lesions in
            raise SeriesSkipped(f"lungs not found ({lung_ml:.0f} mL segmented, needs "
                                f"{MIN_LUNG_ML:.0f}): not a CT through the chest")
        lesion = models["lesions"].predict(hu, lung)
        classifier: CtClassifier = models["classifier"]
        scores = classifier.predict(lung, lesion, spacing)
        lung_model = models["lung_spec"].info()
        lesion_model = models["lesions"].spec.info()
        cls_model = classifier.spec.info()
        threshold = classifier.spec.thresholds["decision"]
        probabilities = [ClassProbability(k, classifier.spec.label(k).code(), p)
                         for k, p in scores.items()]
        predicted = "covid" if scores["covid"] >= threshold else "non_covid"

        masks = [
            Mask("lung_right", "Right lung", codes.ANATOMICAL_STRUCTURE, codes.RIGHT_LUNG,
                 lung == RIGHT, lung_model),
            Mask("lung_left", "Left lung", codes.ANATOMICAL_STRUCTURE, codes.LEFT_LUNG,
                 lung == LEFT, lung_model),
            Mask("ggo", "Ground glass opacity", codes.MORPHOLOGICALLY_ABNORMAL,
                 codes.GROUND_GLASS, lesion == GGO, lesion_model, anatomic_region=codes.LUNG),
            Mask("consolidation", "Consolidation", codes.MORPHOLOGICALLY_ABNORMAL,
                 codes.CONSOLIDATION, lesion == CONSOLIDATION, lesion_model,
                 anatomic_region=codes.LUNG),
        ]
        return Findings(
            kind="ct",
            series_instance_uid=series.series_instance_uid,
            classification=Classification(cls_model, probabilities, predicted, threshold),
            masks=masks,
            measurements=measurements(lung, lesion, spacing),
            models=[lung_model, lesion_model, cls_model],
        )


def measurements(lung: np.ndarray, lesion: np.ndarray,
                 spacing: tuple[float, float, float]) -> list[Measurement]:
    """Volumes in mL per segment, and percent of each lung (and both) involved by lesions."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ml = codes.MILLILITER
    out = [
        Measurement(codes.VOLUME, voxel_ml * int((lung == RIGHT).sum()), ml, "lung_right",
                    codes.RIGHT_LUNG),
        Measurement(codes.VOLUME, voxel_ml * int((lung == LEFT).sum()), ml, "lung_left",
                    codes.LEFT_LUNG),
        Measurement(codes.VOLUME, voxel_ml * int((lesion == GGO).sum()), ml, "ggo", codes.LUNG),
        Measurement(codes.VOLUME, voxel_ml * int((lesion == CONSOLIDATION).sum()), ml,
                    "consolidation", codes.LUNG),
    ]
    involved = lesion > 0
    sides: list[tuple[str, Code, np.ndarray]] = [
        ("lung_right", codes.RIGHT_LUNG, lung == RIGHT),
        ("lung_left", codes.LEFT_LUNG, lung == LEFT),
    ]
    for key, site, side in sides:
        total = int(side.sum())
        percent = 100.0 * int((involved & side).sum()) / total if total else 0.0
        out.append(Measurement(codes.PERCENT_INVOLVED, percent, codes.PERCENT, key, site))
    both = int((lung > 0).sum())
    percent = 100.0 * int((involved & (lung > 0)).sum()) / both if both else 0.0
    out.append(Measurement(codes.PERCENT_INVOLVED, percent, codes.PERCENT, None, codes.LUNG))
    return out
