"""One decision rule for node and evaluation; the heatmap explains the CALLED class; device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_plugin.ml.cxr import CLASS_KEYS, MODELS_DIR, CxrClassifier, decide, to_network_input
from covid_plugin.ml.cxr import preprocess as cxr_preprocess
from covid_plugin.ml.cxr_lungs import CxrLungSegmenter
from covid_plugin.pipelines.cxr import CxrPipeline
from covid_plugin.volume import LoadedSeries, load_series_files

SAMPLE = Path(__file__).resolve().parents[1] / "dicom_samples" / "cxr-normal_nih-cxr14-PA"
CLASSIFIER = MODELS_DIR / "cxr-classifier"
needs_models = pytest.mark.skipif(
    not (CLASSIFIER / "spec.json").is_file() or not SAMPLE.is_dir(),
    reason="models/cxr-classifier or dicom_samples not present")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def series() -> LoadedSeries:
    return load_series_files(sorted(SAMPLE.glob("*.dcm")))


def test_decide_calls_covid_at_the_threshold_not_by_argmax() -> None:
    probs = {"normal": 0.6, "pneumonia_other": 0.1, "covid": 0.3}
    assert decide(probs, covid_threshold=0.25) == "covid"
    assert decide(probs, covid_threshold=0.35) == "normal"
    assert decide({"normal": 0.2, "pneumonia_other": 0.3, "covid": 0.5}, 0.6) == \
        "pneumonia_other"


def test_evaluation_scores_with_the_node_rule() -> None:
    """`training evaluate` calls the very function the node calls, film by film."""
    from training.cxr_classifier import evaluate, scoring

    assert scoring.decide is decide and evaluate.rule_calls is scoring.rule_calls
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=200)
    expected = [CLASS_KEYS.index(decide(dict(zip(CLASS_KEYS, p, strict=True)), 0.3))
                for p in probs]
    assert scoring.rule_calls(probs, 0.3).tolist() == expected


def disagreeing(clf: CxrClassifier, image: np.ndarray) -> str:
    """Move the COVID threshold so that the rule's call differs from the argmax; returns the
    argmax class."""
    probs = clf.predict(image).probabilities
    argmax = max(probs, key=probs.__getitem__)
    clf.covid_threshold = probs["covid"] * 0.5 if argmax != "covid" else 1.01
    return argmax


@needs_models
def test_heatmap_and_region_explain_the_called_class_not_the_argmax(
        series: LoadedSeries) -> None:
    """When the rule's call differs from the most probable class, the heatmap (and so the SEG
    segment 'region driving the classification') is the called class's GradCAM."""
    pipeline = CxrPipeline()
    models = pipeline.load_models(MODELS_DIR, "cpu")
    clf: CxrClassifier = models["classifier"]
    image = series.array[0]
    argmax = disagreeing(clf, image)
    pred = clf.predict(image)
    assert pred.called != argmax
    called_map = clf.explain(image, pred.called)
    assert np.allclose(pred.heatmap, called_map, atol=1e-6)
    assert not np.allclose(pred.heatmap, clf.explain(image, argmax), atol=1e-3)

    findings = pipeline.run(series, models)
    assert findings.classification.predicted == pred.called
    lungs = models["lungs"].predict(image)
    expected = np.where(lungs, called_map, 0.0)
    if expected.max() > 0:  # a class's GradCAM may be cold everywhere inside the lungs
        expected /= expected.max()
    assert np.allclose(findings.heatmap[0], expected, atol=1e-5)


@needs_models
def test_device_setting_leaves_cpu_results_unchanged(series: LoadedSeries) -> None:
    """The classifier on the configured device: on a CPU-only machine "auto" and "cpu" give
    the probabilities of a plain forward pass (within 1e-5) and the same heatmap."""
    image = series.array[0]
    default = CxrClassifier.load(CLASSIFIER)
    prepared, _ = cxr_preprocess(image, default.size, default.crop)
    with torch.no_grad():
        logits = default.network(to_network_input(torch.from_numpy(prepared)[None]))[0, :3]
    reference = torch.softmax(logits / default.temperature, 0).numpy()
    base = default.predict(image)
    for device in ("cpu", "auto"):
        clf = CxrClassifier.load(CLASSIFIER, device)
        expected = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                else "cpu")
        assert next(clf.network.parameters()).device.type == expected.type
        pred = clf.predict(image)
        got = np.array([pred.probabilities[k] for k in CLASS_KEYS])
        tolerance = 1e-5 if expected.type == "cpu" else 1e-3
        assert np.abs(got - reference).max() <= tolerance
        assert pred.called == base.called
        assert np.allclose(pred.heatmap, base.heatmap, atol=tolerance * 10)


@pytest.mark.skipif(not (MODELS_DIR / "cxr-lung" / "spec.json").is_file() or not SAMPLE.is_dir(),
                    reason="models/cxr-lung or dicom_samples not present")
def test_lung_model_runs_on_the_configured_device(series: LoadedSeries) -> None:
    image = series.array[0]
    cpu = CxrLungSegmenter.load(MODELS_DIR / "cxr-lung")
    auto = CxrLungSegmenter.load(MODELS_DIR / "cxr-lung", "auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(auto.network.parameters()).device.type == expected
    assert np.abs(auto.probability(image) - cpu.probability(image)).max() < 1e-4
