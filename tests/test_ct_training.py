"""`python -m training train|evaluate ct-*` on a handful of real slices (few steps, no accuracy)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_plugin.ml.ct_cls import CtClassifier
from covid_plugin.ml.ct_lesion import LesionSegmenter
from covid_plugin.ml.ct_lung import segment_lungs
from covid_plugin.ml.spec import CtLesionSpec, ModelIntegrityError, load_spec
from tests.conftest import DATA  # COVID_PLUGIN_DATA, default ../shared/data
from training.__main__ import main

pytestmark = pytest.mark.data
SMALL = ["--medseg-per-batch", "1", "--negatives-per-batch", "1", "--positives-per-batch", "1",
         "--crop", "64", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    out = root / "ct-lesion"
    args = ["train", "ct-lesion", "--data", str(DATA), "--out", str(out), "--device", "cpu",
            "--max-steps", "2", "--limit", "2", "--cache", str(root / "cache"), *SMALL]
    assert main(args) == 0
    return out


def test_lesion_training_writes_a_loadable_model(lesion_model):
    spec = load_spec(lesion_model, CtLesionSpec)
    assert spec.weights_sha256 and (lesion_model / spec.weights).stat().st_size < 25e6
    trained_on = spec.data["trained_on"]
    assert trained_on["negative_slices"] > 0 and trained_on["positive_slices"] > 0
    assert spec.intensity.lower_hu < -700 < 0 < spec.intensity.upper_hu
    assert {lbl.key: lbl.value for lbl in spec.labels}["consolidation"] == "95436008"
    assert (lesion_model / "window_calibration.json").is_file()


def test_lesion_inference_on_a_real_series_stays_inside_the_lungs(lesion_model):
    from training.common.ct_series import load_hu_series

    series = load_hu_series(DATA, ["tcia-lung-pet-ct-dx_Lung_Dx-A0002"])[0]
    hu = series.hu[::4]
    lung = segment_lungs(hu, series.spacing)
    lesion = LesionSegmenter.load(lesion_model).predict(hu, lung)
    assert lesion.shape == hu.shape and lesion.dtype == np.uint8
    assert set(np.unique(lesion)) <= {0, 1, 2}
    assert not lesion[lung == 0].any()


def test_resume_continues_from_the_checkpoint(lesion_model):
    cache = lesion_model.parent / "cache"
    assert torch.load(cache / "run-all" / "last.ckpt", weights_only=False)["step"] == 2
    args = ["train", "ct-lesion", "--data", str(DATA), "--out", str(lesion_model), "--resume",
            "--max-steps", "3", "--limit", "2", "--cache", str(cache), *SMALL]
    assert main(args) == 0
    assert torch.load(cache / "run-all" / "last.ckpt", weights_only=False)["step"] == 3


def test_a_fold_model_never_trains_on_its_held_out_patients_or_slices():
    from training.common.ct_folds import FOLDS, medseg_held_out
    from training.ct_lesion.hu_slices import training_patients

    for fold, held_out in FOLDS.items():
        assert not set(training_patients(fold)) & set(held_out)
        assert set(training_patients(fold)) | set(held_out) == set(training_patients("all"))
    assert [medseg_held_out(i, "A") for i in range(4)] == [True, False, True, False]
    assert not any(medseg_held_out(i, "B") == medseg_held_out(i, "A") for i in range(4))


def test_tampered_weights_are_refused(lesion_model, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(lesion_model, copy)
    weights = copy / load_spec(copy).weights
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF
    weights.write_bytes(bytes(content))
    with pytest.raises(ModelIntegrityError):
        LesionSegmenter.load(copy)


def test_lesion_evaluate_writes_dice_and_iou(lesion_model):
    assert main(["evaluate", "ct-lesion", "--data", str(DATA), "--out", str(lesion_model),
                 "--limit", "1", "--folds", str(lesion_model.parent / "no-folds")]) == 0
    metrics = json.loads((lesion_model / "metrics.json").read_text())
    assert metrics["headline"]["out_of_fold"] is False  # said, not hidden
    assert set(metrics["headline"]["goals"]) >= {"medseg_test_dice_lesion >= 0.60"}
    test = metrics["test_slices_8bit"]
    assert test["n_slices"] == 1 and "patient" in test["note"]
    assert set(test["dice_pooled"]) >= {"ggo", "consolidation", "lesion"}
    assert set(test["iou_mean_per_slice"]) == {"ggo", "consolidation", "lesion"}
    assert (lesion_model / "card.md").read_text().startswith("# ct-lesion")


def test_ct_cls_train_and_evaluate_per_patient(lesion_model, tmp_path):
    out = tmp_path / "ct-classifier"
    assert main(["train", "ct-cls", "--data", str(DATA), "--out", str(out)]) == 0
    assert CtClassifier.load(out).spec.label("covid").value == "840539006"
    assert main(["evaluate", "ct-cls", "--data", str(DATA), "--out", str(out), "--limit", "2",
                 "--lesion-model", str(lesion_model),
                 "--lesion-folds", str(lesion_model.parent / "no-folds")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_patients"] == 2 and metrics["n_covid"] == 1
    assert all(0.0 <= r["score"] <= 1.0 for r in metrics["per_patient"].values())
    assert (out / "roc_per_patient.png").is_file()


def test_ct_lung_train_writes_rule_spec_and_checks(tmp_path):
    out = tmp_path / "ct-lung"
    assert main(["train", "ct-lung", "--data", str(DATA), "--out", str(out), "--limit", "1"]) == 0
    spec = load_spec(out)
    assert spec.weights is None
    assert [lbl.value for lbl in spec.labels] == ["3341006", "44029006", "39607008"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["all_two_lungs"] and metrics["all_plausible"]
    assert (out / "overlay_lungs.png").is_file()
