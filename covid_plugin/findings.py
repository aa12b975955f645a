"""What a pipeline found: the one record that travels from pipelines/ to outputs/.

Plain dataclasses with numpy arrays, so that the writers need neither torch nor the model code.
Every mask is aligned with the frames of the LoadedSeries it came from (same order, same
rows/cols), which is what lets the SEG writer register frames to source slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Code:
    """A coded concept, e.g. Code("840539006", "SCT", "COVID-19")."""

    value: str
    scheme: str
    meaning: str


# The sides of the chest, which the pipelines name their masks by and the writers label
# outlines with (outputs/regions.sided): here, because both layers read findings.
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")


@dataclass(frozen=True)
class ModelInfo:
    """Identifies the model that produced a result; goes into every output object."""

    name: str
    version: str
    sha256: str


@dataclass
class ClassProbability:
    """One label of a classifier with its calibrated probability."""

    key: str
    code: Code
    probability: float


@dataclass
class Classification:
    """A classifier's output: every label's probability and the label it decided on."""

    model: ModelInfo
    probabilities: list[ClassProbability]
    predicted: str
    threshold: float | None = None

    def probability_of(self, key: str) -> float:
        return next(p.probability for p in self.probabilities if p.key == key)


@dataclass
class Mask:
    """A binary mask over the whole series: shape (frames, rows, cols), dtype bool.

    `category` and `property_type` are the segment codes the SEG writer uses; `key` is how
    measurements refer to the segment.
    """

    key: str
    label: str
    category: Code
    property_type: Code
    array: np.ndarray
    model: ModelInfo
    anatomic_region: Code | None = None


@dataclass
class Measurement:
    """A number with its unit (UCUM), optionally about one segment and one finding site."""

    name: Code
    value: float
    unit: Code
    mask_key: str | None = None
    finding_site: Code | None = None


@dataclass(frozen=True)
class Predecessor:
    """An earlier SR of the same source series that this run's SR replaces (the series was
    run again because more instances arrived); the SR lists it as a predecessor document."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class Findings:
    """Everything one pipeline run learned about one series."""

    kind: str  # "cxr" or "ct"
    series_instance_uid: str
    classification: Classification | None = None
    masks: list[Mask] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    heatmap: np.ndarray | None = None  # float32 in [0, 1], same shape as the series' frames
    models: list[ModelInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predecessors: list[Predecessor] = field(default_factory=list)
