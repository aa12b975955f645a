"""spec.json of the series-level CT COVID-19 rule (models/ct-classifier)."""

from __future__ import annotations

from covid_plugin.ml.spec import CtClassifierSpec, LabelSpec
from training.common.ct_rule import THRESHOLDS
from training.common.ct_series import SOURCES


def spec() -> CtClassifierSpec:
    return CtClassifierSpec(
        version="1.0.0",
        task="classification",
        weights=None,
        weights_sha256=None,
        labels=[
            LabelSpec(key="covid", value="840539006", scheme="SCT", meaning="COVID-19"),
            LabelSpec(key="non_covid", value="260385009", scheme="SCT", meaning="Negative"),
        ],
        input={
            "lung": "ct-lung labels (1 right, 2 left)",
            "lesion": "ct-lesion labels (1 GGO, 2 consolidation)",
            "level": "series",
        },
        intensity={},
        spacing=None,
        thresholds=THRESHOLDS,
        rule="score = ramp(involvement%, burden_low, burden_high) * (w_base + "
             "w_bilateral*ramp(min(right%, left%)) + w_peripheral*ramp(peripheral fraction) + "
             "w_ggo*ramp(GGO fraction)); covid if score >= decision. Not calibrated.",
        depends_on=["ct-lung", "ct-lesion"],
        data={
            "evaluated_on": [f"{name}: {licence}" for name, licence in SOURCES.values()],
            "split": "ramps set a priori; decision (and the lesion threshold and smallest "
                     "lesion of ct-lesion) chosen leave-one-patient-out, shipped as chosen on "
                     "all patients",
        },
    )
