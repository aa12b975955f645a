"""The CXR preprocessing the node and the training share, and the inference API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_plugin.ml.cxr import (
    CLASS_KEYS,
    INPUT_SIZE,
    MODELS_DIR,
    CxrClassifier,
    LungCrop,
    build_network,
    prepare,
    preprocess,
    to_network_input,
    unit_range,
)
from covid_plugin.ml.spec import ModelIntegrityError, sha256_of
from tests.conftest import DATA  # COVID_PLUGIN_DATA, default ../shared/data
from training.common.data import read_grey, read_manifests
from training.cxr_classifier.data import load_cache, network_batch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread, restored afterwards: the CPU is shared, and oversubscribed OpenMP
    threads made one 224 px forward pass take 2.3 s instead of 0.07 s here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
LUNG_DIR = MODELS_DIR / "cxr-lung"
needs_lungs = pytest.mark.skipif(not (LUNG_DIR / "spec.json").is_file(),
                                 reason="models/cxr-lung not present")


def three_geometries() -> list:
    """One squashed child, one unsquashed adult COVID film, one NIH adult."""
    items = read_manifests(DATA, ["cxr", "cxr_adult"])
    return [next(it for it in items if it.source == s) for s in ("kermany", "hannover",
                                                                   "nih_cxr14")]


@pytest.mark.data
def test_training_path_and_inference_path_give_the_same_tensor(tmp_path: Path) -> None:
    picks = three_geometries()
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


def write_model(folder: Path, lung_crop: dict | None = None) -> Path:
    """A model folder with untrained weights: enough to test loading and the output contract."""
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(build_network().state_dict(), folder / "w.pt")
    spec = {
        "name": "cxr-classifier", "version": "0", "task": "classification", "weights": "w.pt",
        "weights_sha256": sha256_of(folder / "w.pt"),
        "labels": [{"key": k, "value": "1", "scheme": "SCT", "meaning": k} for k in CLASS_KEYS],
        "input": {"size": INPUT_SIZE}, "thresholds": {"covid": 0.5, "lateral": 0.5},
        "temperature": 1.5,
    }
    if lung_crop is not None:
        spec["lung_crop"] = lung_crop
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
    assert clf.crop is None  # a spec without lung_crop is v1: the whole film, no lung model


def test_classifier_refuses_weights_that_do_not_match_the_spec(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    with open(folder / "w.pt", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ModelIntegrityError):
        CxrClassifier.load(folder)


def lung_block(margin: float = 0.05) -> dict:
    return LungCrop.load(LUNG_DIR, margin).describe().model_dump()


@pytest.mark.data
@needs_lungs
def test_training_path_and_inference_path_give_the_same_tensor_with_the_lung_crop(
    tmp_path: Path,
) -> None:
    """The v2 cache (training) and CxrClassifier.predict (node) feed the network one tensor."""
    clf = CxrClassifier.load(write_model(tmp_path / "m", lung_block()))
    assert clf.crop is not None
    picks = three_geometries()
    cached = load_cache(picks, DATA, INPUT_SIZE, tmp_path / "cache", clf.crop)
    training = network_batch(cached, np.arange(len(picks)))
    seen: list[torch.Tensor] = []
    hook = clf.network.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        for k, item in enumerate(picks):
            image = read_grey(DATA / item.path)
            seen.clear()
            pred = clf.predict(image)
            assert torch.equal(training[k], seen[0][0])
            # the crop changed what the network sees (v1 input differs) ...
            v1 = to_network_input(torch.from_numpy(prepare(image))[None])[0]
            assert not torch.equal(v1, training[k])
            # ... and the heatmap is in the original frame, zero outside the crop
            r0, r1, c0, c1 = preprocess(image, INPUT_SIZE, clf.crop)[1]
            assert pred.heatmap.shape == image.shape
            outside = np.ones(image.shape, bool)
            outside[r0:r1, c0:c1] = False
            assert (r1 - r0, c1 - c0) != image.shape and not pred.heatmap[outside].any()
            assert 0.0 <= pred.heatmap.min() and pred.heatmap.max() <= 1.0
    finally:
        hook.remove()


@needs_lungs
def test_classifier_refuses_a_lung_model_other_than_the_one_it_was_trained_with(
    tmp_path: Path,
) -> None:
    block = {**lung_block(), "weights_sha256": "0" * 64}
    with pytest.raises(ModelIntegrityError, match="lung model"):
        CxrClassifier.load(write_model(tmp_path / "m", block))


class _Segmenter:
    """Stands in for the lung model: returns a fixed mask."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.mask


def stub_crop(mask: np.ndarray, margin: float) -> LungCrop:
    return LungCrop(_Segmenter(mask), margin)  # type: ignore[arg-type]


def test_crop_grows_the_lung_box_by_the_margin_and_ignores_implausible_masks() -> None:
    image = np.random.default_rng(2).random((200, 100)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[50:150, 20:80] = True
    out, box = preprocess(image, 64, stub_crop(mask, 0.1))
    assert box == (30, 170, 10, 90) and out.shape == (64, 64)
    assert np.array_equal(out, prepare(image[30:170, 10:90], 64))
    speck = np.zeros(image.shape, bool)
    speck[5:15, 5:15] = True  # a marker, not lungs: the whole film is used
    assert preprocess(image, 64, stub_crop(speck, 0.0))[1] == (0, 200, 0, 100)
    empty = np.zeros(image.shape, bool)  # nothing found: the whole film, never an error
    assert preprocess(image, 64, stub_crop(empty, 0.1))[1] == (0, 200, 0, 100)
