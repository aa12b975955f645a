"""Series-level COVID-19 score from lesion burden and distribution (a rule, no weights).

With a handful of CT patients, a trained classifier would learn the patients. The rule encodes
the typical COVID-19 pattern of the RSNA/Fleischner consensus statements instead: ground-glass
dominant, bilateral, peripheral (subpleural) opacities. Each term maps a measured feature to
[0, 1] between two thresholds from spec.json:

    score = burden * (w_base + w_bilateral * bilateral + w_peripheral * peripheral + w_ggo * ggo)

`burden` (lesion share of lung volume) gates everything: no lesion, no COVID. The score ranks
series; it is not a calibrated probability (too few patients to calibrate), the card says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from covid_plugin.ml.ct_lung import LEFT_LUNG, RIGHT_LUNG
from covid_plugin.ml.spec import CtClassifierSpec, CtRuleThresholds, load_spec


def _ramp(value: float, low: float, high: float) -> float:
    """0 at or below `low`, 1 at or above `high`, linear between."""
    return float(np.clip((value - low) / (high - low), 0.0, 1.0))


def peripheral_zone(lung_slice: np.ndarray, spacing: tuple[float, float, float],
                    peripheral_mm: float) -> np.ndarray:
    """Lung pixels of one slice within `peripheral_mm` of the lung border (pleura)."""
    in_lung = lung_slice > 0
    return in_lung & (ndi.distance_transform_edt(in_lung, sampling=spacing[1:]) <= peripheral_mm)


def lesion_features(
    lung: np.ndarray, lesion: np.ndarray, spacing: tuple[float, float, float],
    peripheral_mm: float, peripheral: np.ndarray | None = None,
) -> dict[str, float]:
    """Burden and distribution of lesions inside the lungs (percentages and fractions).

    Counted slice by slice: whole-volume boolean temporaries of a 600-slice CT would take
    150 MB each. `peripheral` (the `peripheral_zone` of every slice) saves recomputing it when
    one lung mask is scored with many lesion masks (evaluation).
    """
    lung_n = {RIGHT_LUNG: 0, LEFT_LUNG: 0}
    lesion_n = {RIGHT_LUNG: 0, LEFT_LUNG: 0}
    n_peripheral = ggo = 0
    for i in range(lung.shape[0]):
        in_lung = lung[i] > 0
        inside = (lesion[i] > 0) & in_lung
        for value in (RIGHT_LUNG, LEFT_LUNG):
            side = lung[i] == value
            lung_n[value] += int(side.sum())
            lesion_n[value] += int((inside & side).sum())
        if inside.any():
            zone = (peripheral[i] if peripheral is not None
                    else peripheral_zone(lung[i], spacing, peripheral_mm))
            n_peripheral += int((inside & zone).sum())
            ggo += int((inside & (lesion[i] == 1)).sum())
    n_lesion = sum(lesion_n.values())
    return {
        "involvement_percent": 100 * n_lesion / max(sum(lung_n.values()), 1),
        "right_percent": 100 * lesion_n[RIGHT_LUNG] / max(lung_n[RIGHT_LUNG], 1),
        "left_percent": 100 * lesion_n[LEFT_LUNG] / max(lung_n[LEFT_LUNG], 1),
        "peripheral_fraction": n_peripheral / n_lesion if n_lesion else 0.0,
        "ggo_fraction": ggo / n_lesion if n_lesion else 0.0,
    }


def rule_score(features: dict[str, float], t: CtRuleThresholds) -> float:
    """The COVID-19 score in [0, 1] from the features and the spec's thresholds."""
    burden = _ramp(features["involvement_percent"], t.burden_low_pct, t.burden_high_pct)
    bilateral = _ramp(
        min(features["right_percent"], features["left_percent"]),
        t.side_low_pct, t.side_high_pct,
    )
    peripheral = _ramp(features["peripheral_fraction"], t.peripheral_low, t.peripheral_high)
    ggo = _ramp(features["ggo_fraction"], t.ggo_low, t.ggo_high)
    pattern = t.w_base + t.w_bilateral * bilateral + t.w_peripheral * peripheral + t.w_ggo * ggo
    return float(burden * pattern)


class CtClassifier:
    """COVID-19 vs not for one CT series, from the lung and lesion label maps."""

    def __init__(self, spec: CtClassifierSpec):
        self.spec = spec

    @classmethod
    def load(cls, model_dir: Path) -> CtClassifier:
        return cls(load_spec(model_dir, CtClassifierSpec))

    @property
    def lesion_setting(self) -> tuple[float, float] | None:
        """(lesion probability, smallest lesion mL) of the mask the rule's features are computed
        on: the decision's own setting, chosen leave-one-patient-out for the call, apart from
        ct-lesion's measurement setting (the mask a radiologist reads). None: use that mask."""
        t = self.spec.thresholds
        if t.lesion_probability is None:
            return None
        return t.lesion_probability, t.min_lesion_ml

    def features(self, lung: np.ndarray, lesion: np.ndarray, spacing) -> dict[str, float]:
        return lesion_features(lung, lesion, tuple(spacing), self.spec.thresholds.peripheral_mm)

    def predict(self, lung: np.ndarray, lesion: np.ndarray, spacing) -> dict[str, float]:
        """{"covid": score, "non_covid": 1 - score}; spec.thresholds.decision decides."""
        score = rule_score(self.features(lung, lesion, spacing), self.spec.thresholds)
        return {"covid": score, "non_covid": 1.0 - score}
