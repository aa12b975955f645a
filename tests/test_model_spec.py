"""The typed model specs: the shipped ones load unchanged, a misspelt key is refused by name,
and what training writes is what the node's loader reads back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from covid_plugin.ml.ct_lesion import FEATURES
from covid_plugin.ml.ct_lesion import build_network as build_lesion_network
from covid_plugin.ml.cxr_lungs import CxrLungSegmenter
from covid_plugin.ml.cxr_lungs import build_network as build_lung_network
from covid_plugin.ml.spec import (
    CtClassifierSpec,
    CtLesionSpec,
    CtLungSpec,
    CxrClassifierSpec,
    CxrLungSpec,
    HuWindow,
    ModelIntegrityError,
    load_spec,
    save_spec,
    spec_json,
)
from tests.conftest import REPO
from training.ct_cls.spec import spec as ct_cls_spec
from training.ct_lesion.train import WEIGHTS, lesion_spec, write_spec
from training.ct_lung.spec import spec as ct_lung_spec
from training.cxr_lungs.model import NETWORK, write_model

MODELS = REPO / "models"
SHIPPED = {
    "cxr-classifier": CxrClassifierSpec,
    "cxr-lung": CxrLungSpec,
    "ct-lung": CtLungSpec,
    "ct-lesion": CtLesionSpec,
    "ct-classifier": CtClassifierSpec,
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_spec_loads_as_its_class_and_rewrites_to_the_same_values(name: str) -> None:
    spec = load_spec(MODELS / name, SHIPPED[name])  # also checks the weights' sha256
    written = json.loads(spec_json(spec))
    shipped = json.loads((MODELS / name / "spec.json").read_text())
    assert {k: written[k] for k in shipped} == shipped
    # only optional blocks the file leaves out are added, and they are empty
    assert all(written[k] is None for k in written.keys() - shipped.keys())


def _with_key(tmp_path: Path, name: str, edit) -> Path:
    folder = tmp_path / name
    shutil.copytree(MODELS / name, folder)
    spec = json.loads((folder / "spec.json").read_text())
    edit(spec)
    (folder / "spec.json").write_text(json.dumps(spec, indent=2))
    return folder


def test_a_misspelt_key_is_refused_with_its_path(tmp_path: Path) -> None:
    """With extra keys allowed, `lesion_probabilty` was carried along unread and the node
    measured with the default 0.5 instead of the shipped 0.3."""
    folder = _with_key(tmp_path, "ct-lesion",
                       lambda s: s["thresholds"].update(lesion_probabilty=0.3))
    with pytest.raises(ModelIntegrityError, match=r"thresholds\.lesion_probabilty: Extra inputs"):
        load_spec(folder, CtLesionSpec)
    folder = _with_key(tmp_path, "cxr-classifier",
                       lambda s: s.update(temperture=s.pop("temperature")))
    with pytest.raises(ModelIntegrityError, match="temperture"):
        load_spec(folder, CxrClassifierSpec)


def test_an_unknown_model_or_another_models_spec_is_refused(tmp_path: Path) -> None:
    folder = _with_key(tmp_path, "ct-lung", lambda s: s.update(name="ct-lungs"))
    with pytest.raises(ModelIntegrityError, match="name: Input tag 'ct-lungs'"):
        load_spec(folder)
    with pytest.raises(ModelIntegrityError, match="is the spec of ct-lung, not a CtLesionSpec"):
        load_spec(MODELS / "ct-lung", CtLesionSpec)


@pytest.mark.parametrize("written", [ct_cls_spec, ct_lung_spec], ids=["ct-cls", "ct-lung"])
def test_a_rule_spec_training_writes_round_trips_through_the_loader(
    tmp_path: Path, written
) -> None:
    spec = written()
    save_spec(tmp_path, spec)
    assert load_spec(tmp_path, type(spec)) == spec


def test_cxr_lung_spec_training_writes_loads_in_the_node(tmp_path: Path) -> None:
    write_model(tmp_path, build_lung_network(NETWORK), {"steps": 0})
    segmenter = CxrLungSegmenter.load(tmp_path)
    assert segmenter.spec.network == NETWORK and segmenter.spec.training == {
        "steps": 0, "per_source_cap": segmenter.spec.training["per_source_cap"]}


def test_ct_lesion_spec_training_writes_round_trips_through_the_loader(tmp_path: Path) -> None:
    torch.save(build_lesion_network(FEATURES).state_dict(), tmp_path / WEIGHTS)
    spec = lesion_spec(HuWindow(center=-460.0, width=1440.0, lower_hu=-1180.0, upper_hu=260.0))
    write_spec(tmp_path, spec, {"medseg_slices": 1}, steps=2, fold="all", segments=[[0, 2, 2]])
    loaded = load_spec(tmp_path, CtLesionSpec)
    assert loaded.model_copy(update={"weights": None, "weights_sha256": None, "data": None}) == spec
    assert loaded.data is not None and loaded.data["trained_on"] == {"medseg_slices": 1}
    assert loaded.output.ggo_band_hu == (-700.0, -300.0)
