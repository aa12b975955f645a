"""Chest X-ray: calibrated normal / other pneumonia / COVID-19 and a heatmap inside the lungs.

Only films the model was validated on are classified: frontal views (a lateral film, by its
ViewPosition or by the view head when the header says nothing, is skipped) of patients in the
configured population (adults by default; the age comes from the header). Anything else is
skipped with the reason recorded rather than given a number that means nothing. The call is
made by the model's one decision rule (`covid_plugin.ml.cxr.decide`), and the heatmap and the
"region driving the classification" explain that called class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from covid_plugin.config import CxrPopulationSettings
from covid_plugin.findings import Classification, ClassProbability, Findings, Mask
from covid_plugin.ml.cxr import CxrClassifier
from covid_plugin.ml.cxr_lungs import CxrLungSegmenter
from covid_plugin.pipelines import codes
from covid_plugin.pipelines.interface import SeriesSkipped
from covid_plugin.pipelines.population import patient_age_years, population_reason
from covid_plugin.volume import LoadedSeries

LATERAL_VIEWS = {"LL", "RL", "LLD", "RLD", "LATERAL"}
SUSPICIOUS_LEVEL = 0.5  # heatmap level that outlines the region that drove the decision
MIN_REGION_FRACTION = 0.01  # of the lungs: below this the outline is noise, not a region


class CxrPipeline:
    name = "cxr"
    modalities = ("CR", "DX")
    per_instance = True  # a CR/DX series may hold several films (PA and lateral, say)

    def __init__(self, population: CxrPopulationSettings | None = None) -> None:
        self.population = population or CxrPopulationSettings()

    def load_models(self, models_dir: Path, device: str) -> dict[str, Any]:
        """Both models on the configured device ("auto": CUDA when available)."""
        return {
            "classifier": CxrClassifier.load(models_dir / "cxr-classifier", device),
            "lungs": CxrLungSegmenter.load(models_dir / "cxr-lung", device),
        }

    def run(self, series: LoadedSeries, models: dict[str, Any]) -> Findings:
        header = series.datasets[0]
        reason = population_reason(patient_age_years(header), self.population)
        if reason is not None:
            raise SeriesSkipped(f"not analysable: {reason}")
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
        predicted = prediction.called  # the heatmap below explains this class
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
                                          classifier.covid_threshold),
            masks=masks,
            heatmap=heatmap[None],
            models=[model, lung_model],
        )

