"""The CXR training loop, splits and metrics, on a handful of real images (no accuracy claims)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_plugin.ml.cxr import MODELS_DIR, CxrClassifier, preprocess
from covid_plugin.ml.spec import CxrClassifierSpec, load_spec
from tests.conftest import DATA  # COVID_PLUGIN_DATA, default ../shared/data
from training.__main__ import main
from training.common.data import Item, leakage_groups, make_split, read_grey
from training.common.metrics import bootstrap_auc, expected_calibration_error, macro_f1
from training.cxr_classifier.data import (
    OTHER_ABNORMAL,
    load_cache,
    load_items,
    targets,
    with_other_abnormal,
)
from training.cxr_classifier.export import VERSION_LUNG_CROP
from training.cxr_classifier.train import (
    augment,
    balanced_weights,
    checkpoint_path,
    losses,
    not_covid_loss,
)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread, restored afterwards: the CPU is shared, and oversubscribed OpenMP
    threads made one 224 px forward pass take 2.3 s instead of 0.07 s here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def item(path: str, source: str, patient: str, label: str) -> Item:
    return Item(path, source, patient, label, "PA", "no", "CC0-1.0")


def test_near_duplicates_join_patients_into_one_group() -> None:
    items = [item("a", "s", "p1", "covid"), item("b", "s", "p2", "covid"),
             item("c", "s", "p1", "covid"), item("d", "s", "p3", "covid")]
    groups = leakage_groups(items, [("b", "c"), ("x", "d")])  # "x" is not in the manifest
    assert groups[0] == groups[1] == groups[2]
    assert groups[3] != groups[0]


def test_split_keeps_groups_whole_and_the_held_out_source_out_of_training() -> None:
    rng = np.random.default_rng(0)
    items = [item(f"i{k}", src, f"{src}:{k // 3}", lbl)
             for k, (src, lbl) in enumerate(
                 [("kermany", "normal"), ("ieee8023", "covid"), ("hannover", "covid"),
                  ("nih_cxr14", "normal")][int(j)] for j in rng.integers(0, 4, 420))]
    pairs = [("i0", "i200"), ("i5", "i301")]  # near-duplicates across patients
    groups = leakage_groups(items, pairs)
    split = make_split(items, groups, seed=0, holdout_sources=["hannover"])
    parts = [split.train, split.val, split.test, split.holdout]
    assert sum(map(len, parts)) == len(items)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not set(groups[parts[a]]) & set(groups[parts[b]])
    assert all(items[i].source != "hannover" for i in np.concatenate(parts[:3]))
    again = make_split(items, groups, seed=0)  # no hold-out: same test patients
    assert set(split.test) <= set(again.test)


def test_balanced_weights_classes_equal_sources_by_sqrt_patients_patients_equal() -> None:
    # normal: source k has 4 patients (8 films, patient k0 has 5), source n 1 patient (2 films)
    normal_k = [item(f"k{j}", "k", f"k{min(j, 3) if j < 3 else 0}", "normal") for j in range(8)]
    items = normal_k + [item("n0", "n", "n1", "normal")] * 2 + \
        [item("c", "h", "h1", "covid")] * 5 + [item("o", "n", "n2", OTHER_ABNORMAL)] * 3
    w = balanced_weights(items, np.arange(len(items))).numpy()
    assert w.sum() == pytest.approx(1.0)
    normal, covid, other = w[:10].sum(), w[10:15].sum(), w[15:].sum()
    assert normal == pytest.approx(covid) == pytest.approx(other)  # other-abnormal: a class
    k_patients = len({it.patient_id for it in normal_k})
    assert w[:8].sum() / w[8:10].sum() == pytest.approx(np.sqrt(k_patients))
    per_patient = {p: sum(w[i] for i in range(8) if items[i].patient_id == p)
                   for p in {it.patient_id for it in normal_k}}
    assert np.allclose(list(per_patient.values()), w[:8].sum() / k_patients)


def test_other_abnormal_films_are_negatives_for_covid_only() -> None:
    """-log(1 - p_covid) for other-abnormal films; the 3-class CE ignores them."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    p_covid = torch.softmax(logits[:, :3], 1)[:, 2]
    assert torch.allclose(not_covid_loss(logits[:, :3]), -torch.log1p(-p_covid))
    cls, view = torch.tensor([-1, -1]), torch.tensor([-1, -1])
    other = torch.tensor([True, True])
    loss = losses(logits, cls, view, torch.tensor(1.0), other)
    assert loss == pytest.approx(float(-torch.log1p(-p_covid).mean()))
    assert losses(logits, cls, view, torch.tensor(1.0)) == 0  # unlabelled, not other: nothing
    films = [item("cxr_adult_findings/images/nih/x.jpg", "nih_cxr14", "p", ""),
             item("cxr/images/k.jpg", "kermany", "q", "")]
    assert [with_other_abnormal(f).label for f in films] == [OTHER_ABNORMAL, ""]
    assert targets([with_other_abnormal(films[0])])[0].tolist() == [-1]


def test_augment_is_reproducible_and_stays_in_range() -> None:
    x = torch.rand(6, 1, 64, 64)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)


def test_metrics_behave_on_known_cases() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    assert bootstrap_auc(y, np.array([.1, .2, .8, .9, .7, .3]), n_boot=50)["auc"] == 1.0
    assert bootstrap_auc(np.ones(4), np.ones(4))["auc"] is None
    confident_right = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error(np.array([0, 1, 2, 1]), confident_right) == 0.0
    assert expected_calibration_error(np.array([1, 2, 0, 0]), confident_right) == 1.0
    assert macro_f1(np.array([0, 0, 2]), np.array([0, 0, 2]), 3) == 1.0


@pytest.mark.data
def test_train_a_few_steps_then_resume_and_load(tmp_path: Path) -> None:
    out, cache = tmp_path / "model", tmp_path / "cache"
    common = ["--data", str(DATA), "--out", str(out), "--device", "cpu", "--limit", "56",
              "--cache", str(cache), "--batch-size", "4", "--epoch-samples", "4",
              "--threads", "1"]
    assert main(["train", "cxr", *common, "--epochs", "1"]) == 0
    ckpt = checkpoint_path(cache, out)
    assert ckpt.is_file() and not list(out.glob("*.ckpt"))
    assert main(["train", "cxr", *common, "--epochs", "2", "--resume"]) == 0
    spec = load_spec(out, CxrClassifierSpec)  # checks the sha256 of the weights it names
    history = spec.training["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert (out / spec.weights).stat().st_size < 25 * 2**20
    assert spec.temperature > 0
    assert json.loads((out / "spec.json").read_text())["labels"][2]["value"] == "840539006"
    pred = CxrClassifier.load(out).predict(np.full((50, 40), 0.5, dtype=np.float32))
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.skipif(not (MODELS_DIR / "cxr-lung" / "spec.json").is_file(),
                    reason="models/cxr-lung not present")
@pytest.mark.data
def test_lung_crop_training_pins_the_lung_model_and_the_node_crops_identically(
    tmp_path: Path,
) -> None:
    """v2: spec.json names the lung model by sha256, and the loaded classifier crops the
    cached training images' films to the very same uint8 images."""
    out, cache = tmp_path / "model", tmp_path / "cache"
    lungs = MODELS_DIR / "cxr-lung"
    assert main(["train", "cxr", "--data", str(DATA), "--out", str(out), "--device", "cpu",
                 "--limit", "56", "--cache", str(cache), "--batch-size", "4",
                 "--epoch-samples", "4", "--threads", "1", "--epochs", "1",
                 "--lung-crop", str(lungs), "--lung-margin", "0.05"]) == 0
    spec = json.loads((out / "spec.json").read_text())
    lung_spec = load_spec(lungs)
    assert spec["version"] == VERSION_LUNG_CROP
    assert spec["lung_crop"]["weights_sha256"] == lung_spec.weights_sha256
    assert spec["lung_crop"]["model"] == "cxr-lung" and spec["lung_crop"]["margin"] == 0.05
    clf = CxrClassifier.load(out)  # found in models/, although the classifier is in tmp
    assert clf.crop is not None and clf.crop.margin == 0.05
    items, _ = load_items(DATA, 56, 0)
    cached = load_cache(items, DATA, 224, cache, clf.crop)  # the training run's own cache
    assert len(list(cache.glob("cxr_lung_*.pt"))) == 1
    for k in (0, len(items) - 1):
        image = read_grey(DATA / items[k].path)
        assert np.array_equal(cached[k].numpy(), preprocess(image, 224, clf.crop)[0])


def test_pointing_tests_the_heat_peak_against_boxes_in_image_pixels() -> None:
    """Boxes (x right, y down, staged-image pixels) against the heatmap's hottest pixel."""
    from training.cxr_classifier.pointing import peak_in_boxes

    heat = np.zeros((320, 320), dtype=np.float32)
    heat[200, 50] = 1.0  # row 200, column 50: x = 50.5, y = 200.5
    assert peak_in_boxes(heat, [("Pneumonia", 40.0, 190.0, 60.0, 210.0)])
    assert not peak_in_boxes(heat, [("Pneumonia", 190.0, 40.0, 210.0, 60.0)])  # x/y swapped
    half = np.zeros((160, 160), dtype=np.float32)
    half[100, 25] = 1.0  # the same place on a half-size heatmap
    assert peak_in_boxes(half, [("Pneumonia", 40.0, 190.0, 60.0, 210.0)], scale=(0.5, 0.5))
