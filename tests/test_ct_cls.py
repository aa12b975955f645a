"""The series-level rule: features measure what they claim, the score orders patterns sensibly."""

from __future__ import annotations

import numpy as np
import pytest

from covid_plugin.ml.ct_cls import CtClassifier, lesion_features, rule_score
from training.common.ct_rule import THRESHOLDS
from training.ct_cls.spec import spec

SPACING = (5.0, 1.0, 1.0)


def _lungs() -> np.ndarray:
    """Two 60 x 60 mm square lungs on 4 slices: right on image left, left on image right."""
    lung = np.zeros((4, 100, 160), np.uint8)
    lung[:, 20:80, 10:70] = 1
    lung[:, 20:80, 90:150] = 2
    return lung


def test_features_of_bilateral_peripheral_ggo():
    lung = _lungs()
    lesion = np.zeros_like(lung)
    lesion[:, 20:30, 10:70] = 1  # a 10 mm band along the border of each lung
    lesion[:, 20:30, 90:150] = 1
    f = lesion_features(lung, lesion, SPACING, peripheral_mm=20.0)
    assert f["involvement_percent"] == pytest.approx(100 * 10 / 60)
    assert f["right_percent"] == pytest.approx(f["left_percent"])
    assert f["peripheral_fraction"] == pytest.approx(1.0)
    assert f["ggo_fraction"] == pytest.approx(1.0)


def test_lesion_outside_the_lungs_is_ignored():
    lung = _lungs()
    lesion = np.zeros_like(lung)
    lesion[:, 85:95, :] = 2
    assert lesion_features(lung, lesion, SPACING, 20.0)["involvement_percent"] == 0.0
    assert rule_score(lesion_features(lung, lesion, SPACING, 20.0), THRESHOLDS) == 0.0


def test_typical_pattern_scores_above_atypical_and_the_decision_threshold():
    lung = _lungs()
    typical = np.zeros_like(lung)
    typical[:, 20:28, 10:70] = 1
    typical[:, 20:28, 90:150] = 1
    atypical = np.zeros_like(lung)
    atypical[:, 40:56, 32:48] = 2  # one central consolidation in the right lung
    atypical[:, 40:52, 36:44] = 2
    clf = CtClassifier(spec())
    p_typical = clf.predict(lung, typical, SPACING)
    p_atypical = clf.predict(lung, atypical, SPACING)
    assert p_typical["covid"] >= THRESHOLDS.decision > p_atypical["covid"]
    assert p_typical["covid"] + p_typical["non_covid"] == pytest.approx(1.0)
    assert clf.predict(lung, np.zeros_like(lung), SPACING)["covid"] == 0.0
