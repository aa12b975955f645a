"""CT inference honours the node's `device` and `ct.batch_size`; results do not depend on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from covid_plugin.config import ConfigError, load_settings
from covid_plugin.ml.ct_lesion import LesionSegmenter
from covid_plugin.ml.device import resolve_device
from covid_plugin.pipelines import default_pipelines
from covid_plugin.volume import load_series_files

REPO = Path(__file__).resolve().parents[1]
COVID_SAMPLE = REPO / "dicom_samples" / "ct-covid_covid-ct-md-P002"


def test_auto_is_cuda_only_when_torch_sees_a_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


def test_ct_batch_size_comes_from_the_config():
    settings = load_settings(environ={"COVID_PLUGIN_CT__BATCH_SIZE": "16"})
    ct = next(p for p in default_pipelines(settings) if p.name == "ct")
    assert ct.batch_size == 16
    with pytest.raises(ConfigError):
        load_settings(environ={"COVID_PLUGIN_CT__BATCH_SIZE": "0"})


def test_lesion_labels_do_not_depend_on_the_batch_size():
    series = load_series_files(sorted(COVID_SAMPLE.glob("*.dcm"))[:6])
    lung = np.zeros(series.array.shape, np.uint8)
    lung[:, 150:400, 60:460] = 1
    one = LesionSegmenter.load(REPO / "models" / "ct-lesion", "cpu", batch_size=1)
    five = LesionSegmenter.load(REPO / "models" / "ct-lesion", "auto", batch_size=5)
    a = one.predict(series.array, lung, series.spacing)
    b = five.predict(series.array, lung, series.spacing)
    assert (a > 0).sum() > 0
    assert np.mean(a != b) < 1e-4  # float summation order may flip a pixel at the threshold
