"""Patient right is right: the lungs keep their sides however the scanner stored the series.

Each case is the real normal002 sample stored another way: pixel data flipped and
ImageOrientationPatient / ImagePositionPatient rewritten so that every voxel keeps its
patient position (same patient, same anatomy). The right lung must stay the patient's right,
with the same volume and the same centroid in patient coordinates.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from covid_plugin.ml.ct_lung import LEFT_LUNG, RIGHT_LUNG, segment_lungs
from covid_plugin.volume import LoadedSeries, load_series

SAMPLE = Path(__file__).resolve().parents[1] / "dicom_samples" / "ct-normal_covid-ct-md-normal002"


@pytest.fixture(scope="module")
def datasets() -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(SAMPLE.glob("*.dcm"))]


def restored(datasets: list[pydicom.Dataset], flip_rows: bool, flip_cols: bool) -> LoadedSeries:
    """The series stored with its rows and/or columns mirrored, geometry rewritten to match."""
    out = []
    for source in datasets:
        ds = copy.deepcopy(source)
        pixels = ds.pixel_array
        row_dir = np.array(ds.ImageOrientationPatient[:3], float)  # along a row (columns grow)
        col_dir = np.array(ds.ImageOrientationPatient[3:], float)  # down a column (rows grow)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        position = np.array(ds.ImagePositionPatient, float)
        if flip_cols:  # the old last column is the new first one
            position = position + (ds.Columns - 1) * col_spacing * row_dir
            row_dir, pixels = -row_dir, pixels[:, ::-1]
        if flip_rows:
            position = position + (ds.Rows - 1) * row_spacing * col_dir
            col_dir, pixels = -col_dir, pixels[::-1, :]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        out.append(ds)
    return load_series(out, "CT")


def patient_stats(series: LoadedSeries, labels: np.ndarray) -> dict[int, tuple[float, np.ndarray]]:
    """Volume (mL) and centroid (patient LPS, mm) of each lung label."""
    iop = np.asarray(series.orientation)
    row_spacing, col_spacing = series.spacing[1], series.spacing[2]
    out = {}
    for value in (RIGHT_LUNG, LEFT_LUNG):
        k, r, c = (idx.astype(float) for idx in np.nonzero(labels == value))
        origin = np.asarray(series.positions)[k.astype(int)]
        xyz = origin + np.outer(c * col_spacing, iop[:3]) + np.outer(r * row_spacing, iop[3:])
        out[value] = (k.size * float(np.prod(series.spacing)) / 1000.0, xyz.mean(axis=0))
    return out


@pytest.fixture(scope="module")
def reference(datasets):
    series = restored(datasets, flip_rows=False, flip_cols=False)
    stats = patient_stats(series, segment_lungs(series.array, series.spacing, series.orientation))
    # LPS: the patient's right lung lies at smaller x than the left
    assert stats[RIGHT_LUNG][1][0] < stats[LEFT_LUNG][1][0]
    return stats


@pytest.mark.parametrize(
    ("flip_rows", "flip_cols"),
    [(False, True), (True, False), (True, True)],
    ids=["mirrored-columns", "mirrored-rows", "prone"],
)
def test_right_lung_stays_the_patients_right(datasets, reference, flip_rows, flip_cols):
    series = restored(datasets, flip_rows, flip_cols)
    labels = segment_lungs(series.array, series.spacing, series.orientation)
    stats = patient_stats(series, labels)
    for value in (RIGHT_LUNG, LEFT_LUNG):
        volume, centroid = stats[value]
        ref_volume, ref_centroid = reference[value]
        assert volume == pytest.approx(ref_volume, rel=0.01)
        assert np.linalg.norm(centroid - ref_centroid) < 2.0  # mm, in patient coordinates
