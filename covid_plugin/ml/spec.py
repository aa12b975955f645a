"""The model spec (models/<name>/spec.json): the node's only knowledge of a model.

One typed class per model, picked by the spec's `name`. Every key is declared: a key the class
does not know (a misspelt `temperture`, a block left over from another model) is refused at
load with its path named, instead of being carried along unread while the node silently uses
a default. Training builds the same classes and writes them with `save_spec`, so what it writes
is exactly what the node reads.

The node refuses to load weights whose sha256 differs from the spec, so a model folder that
was edited by hand, half-copied or mixed with another version fails loudly at start-up.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from covid_plugin.findings import Code, ModelInfo


class SpecBlock(BaseModel):
    """A nested block of a spec: unknown keys are refused, as in the spec itself."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class LabelSpec(SpecBlock):
    """One output label and the concept it stands for."""

    key: str
    value: str
    scheme: str
    meaning: str

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class ModelSpec(SpecBlock):
    """The fields every model has; each model's class adds its own, typed (below)."""

    name: str
    version: str
    task: str
    weights: str | None = None  # file name inside the model folder; None for rule-based models
    weights_sha256: str | None = None
    labels: list[LabelSpec]

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.version, self.weights_sha256 or "rule-based")

    def label(self, key: str) -> LabelSpec:
        return next(lbl for lbl in self.labels if lbl.key == key)


# Provenance: what a model was trained or checked on, and its headline metrics. The node reads
# none of it (cards and evaluations do), so its inner shape is free; the key is still declared.
Provenance = dict[str, Any]


class LabelValues(SpecBlock):
    """The label map's values ("0", "1", "2" in spec.json) and what each stands for."""

    value_0: str = Field(alias="0")
    value_1: str = Field(alias="1")
    value_2: str = Field(alias="2")


# --- cxr-classifier -------------------------------------------------------------------------


class CxrClassifierInput(SpecBlock):
    size: int = 224  # the network's square input side (covid_plugin.ml.cxr.INPUT_SIZE)
    geometry: str | None = None
    channels: str | None = None
    orientation: str | None = None
    quantisation: str | None = None


class LungCropSpec(SpecBlock):
    """The lung model a classifier was trained on crops of (covid_plugin.ml.cxr.LungCrop)."""

    model: str
    version: str
    weights_sha256: str | None = None  # None: any weights of that model are accepted
    margin: float
    min_crop_fraction: float


class CxrClassifierIntensity(SpecBlock):
    method: Literal["percentile"]
    lower: float
    upper: float
    at: str | None = None


class CxrClassifierThresholds(SpecBlock):
    covid: float  # calibrated p(COVID-19) at or above which the film is called COVID-19
    lateral: float = 0.5  # sigmoid of the view logit at or above which a film is lateral


class CxrSplit(SpecBlock):
    """How training split the films; evaluation re-makes the same split from it."""

    method: str
    folds: int
    seed: int
    holdout_sources: list[str] = []
    images: dict[str, int]
    limit: int | None = None


class CxrClassifierSpec(ModelSpec):
    name: Literal["cxr-classifier"] = "cxr-classifier"
    view_labels: list[LabelSpec] = []
    input: CxrClassifierInput = CxrClassifierInput()
    lung_crop: LungCropSpec | None = None  # None: the whole film (v1 models)
    intensity: CxrClassifierIntensity | None = None
    thresholds: CxrClassifierThresholds
    decision_rule: str | None = None
    temperature: float = 1.0  # logits are divided by it before the softmax (calibration)
    calibration: Provenance | None = None
    population: Provenance | None = None
    architecture: Provenance | None = None
    data_sources: dict[str, str] | None = None
    training_licences: dict[str, int] | None = None
    split: CxrSplit | None = None
    training: Provenance | None = None
    metrics: Provenance | None = None


# --- cxr-lung -------------------------------------------------------------------------------


class CxrLungInput(SpecBlock):
    size: tuple[int, int]
    channels: int = 1
    geometry: str | None = None


class CxrLungIntensity(SpecBlock):
    input: str | None = None
    method: Literal["percentile"] = "percentile"
    lower_percentile: float
    upper_percentile: float
    applied: str | None = None


class CxrLungThresholds(SpecBlock):
    lung: float  # probability at or above which a pixel is lung
    min_second_lung_fraction: float  # a smaller second component is noise, not a lung


class UNetSpec(SpecBlock):
    """The MONAI UNet's shape (covid_plugin.ml.cxr_lungs.build_network)."""

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_res_units: int


class CxrLungSpec(ModelSpec):
    name: Literal["cxr-lung"] = "cxr-lung"
    input: CxrLungInput
    intensity: CxrLungIntensity
    spacing: list[float] | None = None
    thresholds: CxrLungThresholds
    network: UNetSpec
    teacher: Provenance | None = None
    training: Provenance | None = None


# --- ct-lung --------------------------------------------------------------------------------


class CtLungSpec(ModelSpec):
    """The rule-based lung segmentation: its constants live in covid_plugin.ml.ct_lung; the
    spec records them (provenance), the node does not read them from here."""

    name: Literal["ct-lung"] = "ct-lung"
    input: dict[str, str] = {}
    intensity: dict[str, str | float] = {}
    spacing: list[float] | None = None
    thresholds: dict[str, float] = {}
    output: LabelValues | None = None
    method: str | None = None
    data: Provenance | None = None
    metrics: Provenance | None = None


# --- ct-lesion ------------------------------------------------------------------------------


class CtLesionInput(SpecBlock):
    size: int  # longer side of the thorax crop, resized (covid_plugin.ml.ct_lesion)
    features: tuple[int, ...]  # the BasicUNet's feature widths
    network: str | None = None
    crop: str | None = None
    crop_margin: float = 0.08  # share of the lung bounding box added on each side
    resize: str | None = None
    slices: str | None = None


class HuWindow(SpecBlock):
    """The HU window that maps real CT into the 8-bit domain the network was trained on."""

    kind: Literal["hu_window"] = "hu_window"
    center: float
    width: float
    lower_hu: float | None = None
    upper_hu: float | None = None
    scale: str | None = None
    estimated_by: str | None = None


class CtLesionThresholds(SpecBlock):
    """The measurement setting: the mask the node writes (SEG) and measures (SR)."""

    lesion_probability: float = 0.5
    min_lesion_ml: float = 0.0
    min_mean_probability: float = 0.0


# poorly aerated lung (ground glass) from the first to the second HU, non-aerated above
# (covid_plugin.ml.ct_lesion.attenuation_kind); a spec without `output.ggo_band_hu` gets these
GGO_BAND_HU = (-700.0, -300.0)


class CtLesionOutput(LabelValues):
    restricted_to: str | None = None
    ggo_band_hu: tuple[float, float] = GGO_BAND_HU
    postprocess: str | None = None


class CtLesionSpec(ModelSpec):
    name: Literal["ct-lesion"] = "ct-lesion"
    input: CtLesionInput
    intensity: HuWindow
    spacing: list[float] | None = None
    thresholds: CtLesionThresholds = CtLesionThresholds()
    output: CtLesionOutput
    data: Provenance | None = None
    thresholds_use: str | None = None
    metrics: Provenance | None = None


# --- ct-classifier --------------------------------------------------------------------------


class CtRuleThresholds(SpecBlock):
    """The series-level COVID-19 rule's ramps and weights (covid_plugin.ml.ct_cls.rule_score)
    and its decision; `lesion_probability`/`min_lesion_ml` build the decision's own lesion
    mask (None: the measurement mask of ct-lesion)."""

    burden_low_pct: float
    burden_high_pct: float
    side_low_pct: float
    side_high_pct: float
    peripheral_mm: float
    peripheral_low: float
    peripheral_high: float
    ggo_low: float
    ggo_high: float
    w_base: float
    w_bilateral: float
    w_peripheral: float
    w_ggo: float
    decision: float
    lesion_probability: float | None = None
    min_lesion_ml: float = 0.0


class CtClassifierSpec(ModelSpec):
    name: Literal["ct-classifier"] = "ct-classifier"
    input: dict[str, str] = {}
    intensity: dict[str, Any] = {}
    spacing: list[float] | None = None
    thresholds: CtRuleThresholds
    rule: str | None = None
    depends_on: list[str] = []
    data: Provenance | None = None
    metrics: Provenance | None = None
    thresholds_use: str | None = None


AnySpec = Annotated[
    CxrClassifierSpec | CxrLungSpec | CtLungSpec | CtLesionSpec | CtClassifierSpec,
    Field(discriminator="name"),
]
_ANY_SPEC: TypeAdapter[AnySpec] = TypeAdapter(AnySpec)
S = TypeVar("S", bound=ModelSpec)


class ModelIntegrityError(RuntimeError):
    """A model folder the node must not load: its spec.json does not validate, names another
    model than the one asked for, or its weights do not match the sha256 it names."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_spec(model_dir: Path, kind: type[S] = ModelSpec) -> S:
    """Read spec.json and, if the model has weights, check their hash before anyone loads them.

    `kind` is the class the caller reads: a folder holding another model's spec is refused
    here, not deep in preprocessing with a missing field. A spec that does not validate (an
    unknown or misspelt key, a wrong type) is refused with each key's path named, so the node
    stops at start with the message instead of a traceback.
    """
    path = model_dir / "spec.json"
    try:
        spec = _ANY_SPEC.validate_json(path.read_text())
    except ValidationError as exc:
        # loc starts with the `name` tag that picked the class; an empty rest is the tag itself
        problems = "; ".join(f"{'.'.join(map(str, err['loc'][1:])) or 'name'}: {err['msg']}"
                             for err in exc.errors(include_url=False))
        raise ModelIntegrityError(f"{path}: invalid spec: {problems}") from None
    if not isinstance(spec, kind):
        raise ModelIntegrityError(f"{path} is the spec of {spec.name}, not a {kind.__name__}")
    if spec.weights is not None:
        weights = model_dir / spec.weights
        if not weights.is_file():
            raise ModelIntegrityError(f"{spec.name}: weights file {weights} is missing")
        actual = sha256_of(weights)
        if actual != spec.weights_sha256:
            raise ModelIntegrityError(
                f"{spec.name}: weights {weights.name} sha256 {actual} does not match "
                f"spec.json {spec.weights_sha256}; refusing to load"
            )
    return spec


def spec_json(spec: ModelSpec) -> str:
    """The text of a spec.json: every field in declaration order, two-space indent."""
    return spec.model_dump_json(indent=2, by_alias=True) + "\n"


def save_spec(model_dir: Path, spec: ModelSpec) -> None:
    """Write `spec` as model_dir/spec.json: the one way training writes a spec."""
    (model_dir / "spec.json").write_text(spec_json(spec))
