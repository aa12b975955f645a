"""The CT COVID-19 rule's ramps and weights, written down before the rule met any series.

They follow the radiology consensus description of typical COVID-19 pneumonia (bilateral,
peripheral, ground-glass dominant). Only `decision`, and the lesion network's probability
threshold and smallest lesion, are chosen from data, leave-one-patient-out
(training/common/ct_lopo.py). Shared: ct-cls ships them, ct-lesion's evaluation judges slices
with them.
"""

from __future__ import annotations

from covid_plugin.ml.spec import CtRuleThresholds

THRESHOLDS = CtRuleThresholds(
    burden_low_pct=0.5,  # below: no more than the network's false-positive level
    burden_high_pct=3.0,
    side_low_pct=0.1,  # the less involved lung: bilateral above side_high_pct
    side_high_pct=1.0,
    peripheral_mm=20.0,  # lesion voxel within this distance of the lung border = peripheral
    peripheral_low=0.4,
    peripheral_high=0.8,
    ggo_low=0.4,  # GGO share of lesion volume
    ggo_high=0.8,
    w_base=0.25,
    w_bilateral=0.25,
    w_peripheral=0.25,
    w_ggo=0.25,
    decision=0.5,  # replaced by `evaluate` with the value chosen on all patients (LOPO)
)
