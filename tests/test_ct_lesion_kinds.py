"""Ground glass and consolidation follow attenuation, and nothing draws a grid.

Before, the network chose GGO or consolidation itself: on the COVID sample its
"consolidation" was a thin band along the pleura at a mean of -458 HU (aerated lung plus
partial volume), a vessel on the normal sample was "ground glass", and its stride-2
transposed convolutions added a checkerboard that a low-pass filter had to hide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from covid_plugin.ml.ct_lesion import (
    CONSOLIDATION,
    GGO,
    NONE,
    LesionSegmenter,
    attenuation_kind,
    build_network,
)
from covid_plugin.ml.ct_lung import segment_lungs
from covid_plugin.volume import load_series_files

REPO = Path(__file__).resolve().parents[1]
COVID_SAMPLE = REPO / "dicom_samples" / "ct-covid_covid-ct-md-P002"


def kind_changes_per_lesion_pixel(labels: np.ndarray) -> float:
    """GGO<->consolidation changes between 4-neighbours, per lesion pixel (a grid: ~0.3+)."""
    changes = 0
    for a, b in ((labels[..., 1:], labels[..., :-1]), (labels[..., 1:, :], labels[..., :-1, :])):
        changes += int(((a > 0) & (b > 0) & (a != b)).sum())
    return changes / max(int((labels > 0).sum()), 1)


def test_attenuation_bands_type_lesions_and_leave_out_air_and_vessels():
    hu = np.full((1, 120, 120), -850.0)  # aerated lung
    hu[0, 10:40, 10:40] = -500.0  # poorly aerated: ground glass
    hu[0, 60:100, 60:100] = 20.0  # non-aerated: consolidation
    hu[0, 10:110, 50:52] = 40.0  # a 1.4 mm vessel running through the lung
    kind = attenuation_kind(hu, pixel_mm=0.7)[0]
    assert kind[25, 25] == GGO
    assert kind[80, 80] == CONSOLIDATION
    assert kind[5, 100] == NONE  # aerated lung is no lesion
    assert (kind[20:40, 49:53] == NONE).all()  # the vessel and its rim are neither
    assert kind[45, 25] == NONE


def test_decoder_has_no_transposed_convolutions():
    network = build_network()
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in network.modules())


def test_real_covid_slices_have_dense_consolidation_and_no_label_grid():
    series = load_series_files(sorted(COVID_SAMPLE.glob("*.dcm"))[8:16])
    lung = segment_lungs(series.array, series.spacing, series.orientation)
    lesion = LesionSegmenter.load(REPO / "models" / "ct-lesion").predict(
        series.array, lung, series.spacing)
    assert (lesion > 0).sum() > 2000  # P002 has ground glass here: something to look at
    assert kind_changes_per_lesion_pixel(lesion) < 0.1
    consolidation = series.array[lesion == CONSOLIDATION]
    assert consolidation.size == 0 or consolidation.mean() >= -300
    assert series.array[lesion == GGO].mean() < -300
