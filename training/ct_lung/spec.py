"""spec.json of the rule-based CT lung segmentation (models/ct-lung): the rule's constants."""

from __future__ import annotations

from covid_plugin.ml import ct_lung
from covid_plugin.ml.spec import CtLungSpec, LabelSpec, LabelValues
from training.common.ct_series import SOURCES


def spec() -> CtLungSpec:
    return CtLungSpec(
        version="1.0.0",
        task="segmentation",
        weights=None,
        weights_sha256=None,
        labels=[
            LabelSpec(key="right_lung", value="3341006", scheme="SCT", meaning="Right lung"),
            LabelSpec(key="left_lung", value="44029006", scheme="SCT", meaning="Left lung"),
            LabelSpec(key="lung", value="39607008", scheme="SCT", meaning="Lung"),
        ],
        input={
            "volume": "float32 HU (slices, rows, cols) sorted along the slice normal",
            "working_grid": "in-plane block mean to about 256 px, labels repeated back",
            "orientation": "from ImageOrientationPatient: turned to LPS (SimpleITK DICOMOrient) "
                           "and back; right/left are the patient's",
        },
        intensity={
            "kind": "hu_thresholds",
            "body_hu": ct_lung.BODY_HU,
            "lung_hu": ct_lung.LUNG_HU,
            "airway_hu": ct_lung.AIRWAY_HU,
            "padding_hu": ct_lung.PADDING_HU,
        },
        spacing=None,
        thresholds={
            "min_lung_ml": ct_lung.MIN_LUNG_ML,
            "min_airway_ml": ct_lung.MIN_AIRWAY_ML,
            "max_airway_ml": ct_lung.MAX_AIRWAY_ML,
            "airway_band": ct_lung.AIRWAY_BAND,
            "airway_wall_mm": ct_lung.AIRWAY_WALL_MM,
            "max_bridged_hole_cm2": ct_lung.MAX_BRIDGED_HOLE_CM2,
            "closing_mm": ct_lung.CLOSING_MM,
            "padding_share": ct_lung.PADDING_SHARE,
        },
        output=LabelValues.model_validate({"0": "background", "1": "right_lung",
                                           "2": "left_lung"}),
        method="orient to LPS (SimpleITK) -> threshold -> body -> airway removal (midline "
                  "3D lumen components) -> 3D components -> left/right split (eroded seeds + "
                  "watershed) -> per-slice closing and hole filling, holes open to the "
                  "mediastinum in 3D left out -> back to the source grid (scipy.ndimage, "
                  "scikit-image, SimpleITK); rule-based, nothing trained",
        data={
            "checked_on": [f"{name}: {licence}" for name, licence in SOURCES.values()],
            "split": "none (no parameters fitted); every real HU series is a check",
        },
    )
