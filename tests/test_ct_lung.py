"""Lung extraction from HU on real series: two lungs, right lung on image left, plausible volume."""

from __future__ import annotations

import numpy as np
import pytest

from covid_plugin.ml.ct_lung import LEFT_LUNG, RIGHT_LUNG, lung_volumes_ml, segment_lungs
from tests.conftest import DATA, REPO  # COVID_PLUGIN_DATA, default ../shared/data


def _series(name: str, every: int = 1):
    from training.common.ct_series import load_hu_series

    series = load_hu_series(DATA, [name])[0]
    return series.hu[::every], (series.spacing[0] * every, *series.spacing[1:])


def _check_lungs(labels: np.ndarray, spacing: tuple[float, float, float], slices: int) -> None:
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, RIGHT_LUNG, LEFT_LUNG}
    volumes = lung_volumes_ml(labels, spacing)
    per_mm = volumes["total_ml"] / (slices * spacing[0])
    assert 5.0 < per_mm < 40.0  # adult mid/lower chest: 50-400 cm2 of lung per axial slice
    assert min(volumes["right_ml"], volumes["left_ml"]) > 0.25 * volumes["total_ml"] / 2
    right_cols = np.nonzero(labels == RIGHT_LUNG)[2].mean()
    left_cols = np.nonzero(labels == LEFT_LUNG)[2].mean()
    assert right_cols < labels.shape[2] / 2 < left_cols  # patient right is on image left


@pytest.mark.data
def test_two_lungs_on_a_real_series():
    hu, spacing = _series("tcia-lung-pet-ct-dx_Lung_Dx-A0002")
    labels = segment_lungs(hu, spacing)
    assert labels.shape == hu.shape
    _check_lungs(labels, spacing, hu.shape[0])
    # the lungs are air-filled: most labelled voxels are well below soft tissue
    assert np.median(hu[labels > 0]) < -600


@pytest.mark.data
def test_lung_cut_by_the_reconstruction_circle_is_kept():
    # RIDER: the field of view cuts the chest wall, the lungs touch the padding (-3024 HU)
    hu, spacing = _series("tcia-rider-pilot_0117_chest-ct-nsclc", every=6)
    assert hu.min() < -2000
    labels = segment_lungs(hu, spacing)
    _check_lungs(labels, spacing, hu.shape[0])
    # every slice holds both lungs (the lower slices are where the circle cuts the right lung)
    assert all((labels[i] == RIGHT_LUNG).any() and (labels[i] == LEFT_LUNG).any()
               for i in range(hu.shape[0]))


@pytest.mark.data
def test_dense_consolidation_enclosed_by_lung_stays_lung():
    hu, spacing = _series("covid-ct-md_normal002", every=10)
    labels = segment_lungs(hu, spacing)
    rows, cols = np.nonzero(labels[1] == RIGHT_LUNG)
    r, c = int(rows.mean()), int(cols.mean())
    hu = hu.copy()
    hu[1, r - 6 : r + 6, c - 6 : c + 6] = 40.0  # a 7 mm soft-tissue blob inside the right lung
    filled = segment_lungs(hu, spacing)
    assert (filled[1, r - 6 : r + 6, c - 6 : c + 6] == RIGHT_LUNG).all()


def test_rejects_a_2d_image():
    with pytest.raises(ValueError):
        segment_lungs(np.zeros((64, 64), np.float32), (1.0, 1.0, 1.0))


def _normal_sample():
    from covid_plugin.volume import load_series_files

    samples = REPO / "dicom_samples"
    return load_series_files(sorted((samples / "ct-normal_covid-ct-md-normal002").glob("*.dcm")))


def test_cardiac_fat_pad_wrapped_by_the_lung_is_not_lung():
    # normal002's lowest sample slices: the left lung wraps around the cardiac apex and its fat
    # pad, which 2D hole filling took as lung (37 mL of > -300 HU tissue in one 3D piece); it
    # continues into the mediastinum, so it is not a hole. Vessels stay (small pieces).
    from scipy import ndimage as ndi

    series = _normal_sample()
    labels = segment_lungs(series.array, series.spacing, series.orientation)
    pieces, n = ndi.label((labels > 0) & (series.array > -300))
    voxel_ml = float(np.prod(series.spacing)) / 1000.0
    assert n > 0 and np.bincount(pieces.ravel())[1:].max() * voxel_ml < 15.0


def test_trachea_and_main_bronchi_are_not_lung():
    # normal002 sample block (carina level): the main bronchi's lumen (< -950 HU, 3D pieces
    # near the midline between the lungs); the old 2D blob seeds missed it (3.3 mL as lung)
    from training.ct_lung.evaluate import airway_as_lung_ml

    series = _normal_sample()
    hu, spacing = series.array, series.spacing
    labels = segment_lungs(hu, spacing, series.orientation)
    assert airway_as_lung_ml(hu, labels, spacing) < 0.3
