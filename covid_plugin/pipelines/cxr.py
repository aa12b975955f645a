"""Chest X-ray: calibrated normal / other pneumonia / COVID-19 and a heatmap inside the lungs.

Only frontal films are classified: the model was trained on frontal views, so a lateral film
(by its ViewPosition, or by the view head when the header says nothing) is skipped with the
reason recorded rather than given a number that means nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from covid_plugin.findings import Classification, ClassProbability, Findings, Mask
from covid_plugin.ml.cxr import CxrClassifier
from covid_plugin.ml.cxr_lungs import CxrLungSegmenter
from covid_plugin.pipelines import codes
from covid_plugin.volume import LoadedSeries
from covid_plugin.worker import SeriesSkipped

LATERAL_VIEWS = {"LL", "RL", "LLD", "RLD", "LATERAL"}
SUSPICIOUS_LEVEL = 0.5  # heatmap level that outlines the region that drove the decision
MIN_REGION_FRACTION = 0.01  # of the lungs: below this the outline is noise, not a region


class CxrPipeline:
    name = "cxr"
    modalities = ("CR", "DX")
    per_instance = True  # a CR/DX series may hold several films (PA and lateral, say)

    def load_models(self, models_dir: Path, device: str) -> dict[str, Any]:
        return {
            "classifier": CxrClassifier.load(models_dir / "cxr-classifier"),
            "lungs": CxrLungSegmenter.load(models_dir / "cxr-lung"),
        }

    def run(self, series: LoadedSeries, models: dict[str, Any]) -> Findings:
        header = series.datasets[0]
        view = str(header.get("ViewPosition", "") or "").upper()
        if view in LATERAL_VIEWS:
            raise SeriesSkipped(f"lateral view (ViewPosition {view}); only frontal films")
        image = series.array[0]
        classifier: CxrClassifier = models["classifier"]
        prediction = classifier.predict(image)
        if prediction.view == "lateral" and not view:
            raise SeriesSkipped(
                f"lateral view by the view model (p={prediction.view_probability:.2f})")
        lungs = models["lungs"].predict(image)
        heatmap = np.where(lungs, prediction.heatmap, 0.0).astype(np.float32)
        if heatmap.max() > 0:
            heatmap /= heatmap.max()
        spec = classifier.spec
        model = spec.info()
        probabilities = [
            ClassProbability(key, spec.label(key).code(), p)
            for key, p in prediction.probabilities.items()
        ]
        predicted = decide(prediction.probabilities, spec.thresholds["covid"])
        lung_model = models["lungs"].spec.info()
        masks = [Mask("lungs", "Lungs", codes.ANATOMICAL_STRUCTURE, codes.LUNG, lungs[None],
                      lung_model)]
        region = heatmap >= SUSPICIOUS_LEVEL
        if predicted != "normal" and region.sum() >= MIN_REGION_FRACTION * max(lungs.sum(), 1):
            masks.append(Mask("suspicious_region", "Region driving the classification",
                              codes.MORPHOLOGICALLY_ABNORMAL, codes.LESION, region[None], model,
                              anatomic_region=codes.LUNG))
        return Findings(
            kind="cxr",
            series_instance_uid=series.series_instance_uid,
            classification=Classification(model, probabilities, predicted,
                                          spec.thresholds["covid"]),
            masks=masks,
            heatmap=heatmap[None],
            models=[model, lung_model],
        )


def decide(probabilities: dict[str, float], covid_threshold: float) -> str:
    """COVID-19 at the shipped operating point (the threshold its sensitivity and specificity
    were measured at); otherwise the more probable of the other labels."""
    if probabilities["covid"] >= covid_threshold:
        return "covid"
    others = {k: p for k, p in probabilities.items() if k != "covid"}
    return max(others, key=others.get)
