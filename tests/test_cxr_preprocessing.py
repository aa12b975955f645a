"""The CXR preprocessing the node and the training share, and the inference API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_plugin.ml.cxr import (
    CLASS_KEYS,
    INPUT_SIZE,
    CxrClassifier,
    build_network,
    prepare,
    to_network_input,
    unit_range,
)
from covid_plugin.ml.spec import ModelIntegrityError, sha256_of
from training.cxr import load_cache, network_batch
from training.data import read_grey, read_manifests

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "cxr" / "manifest.csv").is_file(),
                                reason="shared/data not present")


@needs_data
def test_training_path_and_inference_path_give_the_same_tensor(tmp_path: Path) -> None:
    items = read_manifests(DATA, ["cxr", "cxr_adult"])
    # one squashed child, one unsquashed adult COVID film, one NIH adult: three geometries
    picks = [next(it for it in items if it.source == s) for s in ("kermany", "hannover",
                                                                    "nih_cxr14")]
    cached = load_cache(picks, DATA, INPUT_SIZE, tmp_path)
    training = network_batch(cached, np.arange(len(picks)))
    for k, item in enumerate(picks):
        inference = to_network_input(torch.from_numpy(prepare(read_grey(DATA / item.path)))[None])
        assert torch.equal(training[k], inference[0])


def test_prepare_stretches_to_a_square_without_padding() -> None:
    image = np.zeros((100, 300), dtype=np.float32)
    image[:, 150:] = 1.0  # right half white: stretched, it must still fill the right half
    out = prepare(image)
    assert out.shape == (INPUT_SIZE, INPUT_SIZE) and out.dtype == np.uint8
    assert out[:, : INPUT_SIZE // 2 - 2].max() == 0
    assert out[:, INPUT_SIZE // 2 + 2 :].min() == 255


def test_prepare_ignores_the_intensity_scale_of_the_input() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((240, 200)).astype(np.float32)
    twelve_bit = image * 3000.0 + 500.0  # what a raw DICOM would carry
    diff = np.abs(prepare(image).astype(int) - prepare(twelve_bit).astype(int))
    assert diff.max() <= 1


def test_prepare_rejects_colour_or_volume_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        prepare(np.zeros((10, 10, 3), dtype=np.float32))


def test_network_input_is_three_channel_in_minus_one_to_one() -> None:
    x = to_network_input(torch.tensor([[[0, 255], [128, 64]]], dtype=torch.uint8))
    assert x.shape == (1, 3, 2, 2)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(x[:, 0], x[:, 2])


def test_heatmap_scaling_keeps_the_hottest_region_hottest() -> None:
    cam = torch.tensor([[[[0.0, 2.0], [4.0, 8.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    scaled = unit_range(cam)
    assert scaled[0, 0, 1, 1] == 1.0 and scaled[0, 0, 0, 0] == 0.0
    assert torch.equal(scaled[1], torch.zeros_like(scaled[1]))  # flat map: no NaN, no heat


def write_model(folder: Path) -> Path:
    """A model folder with untrained weights: enough to test loading and the output contract."""
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(build_network().state_dict(), folder / "w.pt")
    spec = {
        "name": "cxr-classifier", "version": "0", "task": "classification", "weights": "w.pt",
        "weights_sha256": sha256_of(folder / "w.pt"),
        "labels": [{"key": k, "value": "1", "scheme": "SCT", "meaning": k} for k in CLASS_KEYS],
        "input": {"size": INPUT_SIZE}, "thresholds": {"lateral": 0.5}, "temperature": 1.5,
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder


def test_classifier_output_contract(tmp_path: Path) -> None:
    clf = CxrClassifier.load(write_model(tmp_path / "m"))
    image = np.random.default_rng(1).random((300, 257)).astype(np.float32)
    pred = clf.predict(image)
    assert set(pred.probabilities) == set(CLASS_KEYS)
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert pred.view in ("frontal", "lateral") and 0.5 <= pred.view_probability <= 1.0
    assert pred.heatmap.shape == image.shape and pred.heatmap.dtype == np.float32
    assert 0.0 <= pred.heatmap.min() and pred.heatmap.max() <= 1.0


def test_classifier_refuses_weights_that_do_not_match_the_spec(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    with open(folder / "w.pt", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ModelIntegrityError):
        CxrClassifier.load(folder)
