"""The lesion network's preprocessing: the training path and the node's path agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from covid_plugin.ml.ct_lesion import FEATURES, hu_to_network_input, thorax_box, to_network_input
from covid_plugin.ml.ct_lung import segment_lungs
from covid_plugin.ml.ct_window import hu_to_unit, unit_to_hu, window_bounds
from covid_plugin.ml.spec import CtLesionSpec
from tests.conftest import DATA  # COVID_PLUGIN_DATA, default ../shared/data
from training.common.data import read_grey

SPEC = CtLesionSpec.model_validate({
    "version": "test", "task": "segmentation", "labels": [],
    "input": {"size": 256, "features": FEATURES, "crop_margin": 0.08},
    "intensity": {"kind": "hu_window", "center": -460.0, "width": 1440.0},
    "output": {"0": "none", "1": "ggo", "2": "consolidation"},
})
MEDSEG = DATA / "ct" / "images" / "medseg_infnet" / "test_006.png"


@pytest.mark.data
def test_training_slice_gives_the_same_tensor_through_the_node_path():
    # the 8-bit training slice as training reads it ...
    unit = read_grey(MEDSEG)
    trained_on, _ = to_network_input(torch.from_numpy(unit)[None, None], 256)
    # ... and the same slice as HU, through the node's window, crop and resize
    hu = unit_to_hu(unit, *window_bounds(SPEC.intensity))[None]
    whole = (slice(0, hu.shape[1]), slice(0, hu.shape[2]))
    node_sees, place = hu_to_network_input(hu, whole, SPEC)
    assert node_sees.shape == trained_on.shape == (1, 1, 256, 256)
    assert max(place.rows, place.cols) == 256
    torch.testing.assert_close(node_sees, trained_on, atol=1e-5, rtol=0)


@pytest.mark.data
def test_real_hu_slice_and_its_8bit_export_agree_within_quantisation(tmp_path):
    from training.common.ct_series import load_hu_series

    series = load_hu_series(DATA, ["covid-ct-md_P002"])[0]
    hu = series.hu[10:11]
    box = thorax_box(segment_lungs(series.hu[5:16], series.spacing) > 0, 0.08)
    node_sees, _ = hu_to_network_input(hu, box, SPEC)
    # an 8-bit PNG export of the same crop, read back the way training reads its slices
    crop = hu_to_unit(hu[0, box[0], box[1]], *window_bounds(SPEC.intensity))
    png = tmp_path / "slice.png"
    Image.fromarray(np.round(crop * 255).astype(np.uint8)).save(png)
    trained_path, _ = to_network_input(torch.from_numpy(read_grey(png))[None, None], 256)
    assert (node_sees - trained_path).abs().max() <= 0.5 / 255 + 1e-5
    assert node_sees.std() > 0.1  # a real slice, not an empty frame


def test_to_network_input_keeps_aspect_and_pads_with_air():
    x = torch.ones(2, 1, 100, 200)
    out, place = to_network_input(x, 256)
    assert (place.rows, place.cols) == (128, 256)
    assert out[:, :, : place.top].abs().sum() == 0
    assert torch.all(out[:, :, place.top : place.top + place.rows] == 1)


def test_thorax_box_adds_the_margin_and_stays_inside():
    lung = np.zeros((3, 100, 100), bool)
    lung[1, 20:40, 10:90] = True
    rows, cols = thorax_box(lung, 0.1)
    assert (rows.start, rows.stop) == (18, 42)
    assert (cols.start, cols.stop) == (2, 98)
    rows, cols = thorax_box(np.zeros_like(lung), 0.1)
    assert (rows.stop, cols.stop) == (100, 100)
