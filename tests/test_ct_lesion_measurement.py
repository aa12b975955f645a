"""The lesion mask a radiologist reads (measurement) and the mask the COVID call is computed on
(decision) have their own settings.

Before, one lesion probability (0.9, chosen for the call) also made the SEG mask and the SR
volumes, and nothing checked the mask against a reference outline. Now ct-lesion/spec.json
holds the measurement setting and ct-classifier/spec.json the decision's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from covid_plugin.ml.ct_cls import CtClassifier
from covid_plugin.ml.ct_lesion import (
    CONSOLIDATION,
    NONE,
    LesionSegmenter,
    attenuation_kind,
    filter_lesions,
)
from covid_plugin.ml.ct_lung import segment_lungs
from covid_plugin.volume import load_series_files
from tests.conftest import DATA  # COVID_PLUGIN_DATA, default ../shared/data

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
# The pooled any-lesion Dice of the shipped measurement mask on the 48 MedSeg test slices has a
# slice-bootstrap 95% CI of 0.54-0.63 (models/ct-lesion/metrics.json): below 0.5 the mask has
# got worse than chance variation explains (the old network's mask: 0.21). At P(lesion) 0.5
# with no filter the same path gives 0.54 (CI 0.50-0.59): below 0.45 the path itself (crop,
# window, resize, attenuation kinds) is broken, whatever setting is shipped.
SHIPPED_FLOOR, OPERATING_POINT_FLOOR = 0.5, 0.45

@pytest.mark.data
@pytest.mark.slow
def test_measurement_mask_dice_on_medseg_test_slices_stays_above_its_floor():
    torch.set_num_threads(1)
    from training.ct_lesion.data import load_slices
    from training.ct_lesion.tradeoff import medseg_dice, medseg_probabilities

    segmenter = LesionSegmenter.load(MODELS / "ct-lesion")
    found = medseg_probabilities(segmenter, load_slices(DATA, "test"))  # pooled Dice of both
    shipped = (segmenter.threshold, segmenter.min_lesion_ml, segmenter.min_mean_probability)
    assert medseg_dice(*found, shipped)["lesion"] >= SHIPPED_FLOOR
    assert medseg_dice(*found, (0.5, 0.0, 0.0))["lesion"] >= OPERATING_POINT_FLOOR


def test_decision_mask_has_its_own_setting_and_measurement_keeps_the_spec_one():
    torch.set_num_threads(1)
    series = load_series_files(sorted((REPO / "dicom_samples" / "ct-covid_covid-ct-md-P002")
                                      .glob("*.dcm")))
    hu, spacing = series.array, series.spacing
    lung = segment_lungs(hu, spacing, series.orientation)
    segmenter = LesionSegmenter.load(MODELS / "ct-lesion")
    decision = CtClassifier.load(MODELS / "ct-classifier").lesion_setting
    assert decision is not None, "ct-classifier/spec.json must carry the decision's lesion setting"

    strict = (0.97, 0.0)  # a decision setting far from any measurement setting
    measured, decided = segmenter.predict_with_decision(hu, lung, spacing, strict)
    probability, kind = segmenter.predict_probabilities(hu, lung, spacing)
    expected = filter_lesions(probability, kind, spacing, segmenter.threshold,
                              segmenter.min_lesion_ml, segmenter.min_mean_probability)
    np.testing.assert_array_equal(measured, expected)
    np.testing.assert_array_equal(decided, filter_lesions(probability, kind, spacing, *strict))
    assert (decided > 0).sum() < (measured > 0).sum()  # the P002 sample has lesion at both
    np.testing.assert_array_equal(segmenter.predict(hu, lung, spacing), measured)


def test_node_keeps_one_float16_volume_over_the_thorax_box_and_loses_nothing():
    """Memory (issue 10, item 10): the node holds the network output, while the HU volume is
    still in memory, as one float16 volume over the thorax box, the kind in its sign bit,
    instead of a full probability and a full kind volume (472 MB at 600 slices). Splitting it
    must give exactly the probability and kind the batches produce."""
    torch.set_num_threads(1)
    series = load_series_files(sorted((REPO / "dicom_samples" / "ct-covid_covid-ct-md-P002")
                                      .glob("*.dcm")))
    hu = series.array
    lung = segment_lungs(hu, series.spacing, series.orientation)
    segmenter = LesionSegmenter.load(MODELS / "ct-lesion")
    found = segmenter.infer(hu, lung, series.spacing)
    box = found.box
    assert found.signed.dtype == np.float16
    assert found.signed.shape == (hu.shape[0], box[0].stop - box[0].start,
                                  box[1].stop - box[1].start)
    assert found.signed.size < hu.size
    probability = np.zeros(hu.shape, np.float16)
    kind = np.zeros(hu.shape, np.uint8)
    with torch.inference_mode():
        for index, lesion, inside in segmenter._batches(hu, lung, box):
            full_index = (index, *box)
            by_hu = attenuation_kind(hu[full_index], min(series.spacing[1:]))
            probability[full_index] = lesion.half().numpy() * (inside & (by_hu != NONE))
            kind[full_index] = np.where(by_hu == CONSOLIDATION, 2, 1) * inside
    assert (kind == 2).any() and (kind == 1).any()
    got_probability, got_kind = found.split()
    np.testing.assert_array_equal(found.full(got_probability), probability)
    np.testing.assert_array_equal(found.full(got_kind), kind)
