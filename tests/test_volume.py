"""The series loader on real DICOM: HU, slice order, spacing, transfer syntaxes, radiographs."""

from __future__ import annotations

import copy
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from covid_plugin.volume import LoadedSeries, SeriesError, load_series, load_series_files
from tests.conftest import CHEST_CR, DATA, rider_files
from tests.dicom_validators import DCIODVFY, dciodvfy_errors

CORNERSTONE = DATA / "dicom" / "cornerstone_ctimage_chest-ct-transfer-syntaxes"
ENHANCED_CT = DATA / "dicom" / "nema-mfct_CT0012_enhanced-ct-multiframe"
COVID_CT = DATA / "ct_hu" / "dicom" / "covid-ct-md_P002"
LOCALIZER = DATA / "dicom" / "gdcm-marotech_chest-ct-localizer" / "MAROTECH_CT_JP2Lossy.dcm"
LOSSLESS_SYNTAXES = ("1.2.4.57", "1.2.4.70", "1.2.4.80", "1.2.4.90", "1.2.5", "1.2.1.99")


def read_all(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def two_slice_series(path: Path) -> list[pydicom.Dataset]:
    """A real slice and a copy 5 mm further along its normal: the smallest valid CT volume."""
    first = pydicom.dcmread(path)
    second = copy.deepcopy(first)
    second.SOPInstanceUID = generate_uid()
    normal = np.cross(first.ImageOrientationPatient[:3], first.ImageOrientationPatient[3:])
    second.ImagePositionPatient = list(np.asarray(first.ImagePositionPatient, float) + 5 * normal)
    return [first, second]


@pytest.mark.data
def test_rider_ct_is_sorted_in_hu_with_spacing_from_positions() -> None:
    paths = rider_files()
    shuffled = read_all(paths)
    random.Random(0).shuffle(shuffled)
    series = load_series(shuffled, expected_modality="CT")
    assert series.array.shape == (60, 512, 512)
    assert series.array.dtype == np.int16  # integral rescale: exact HU in half the memory
    # slices are 1.25 mm thick but reconstructed every 0.8 mm: spacing must come from positions
    assert series.spacing[0] == pytest.approx(0.8, abs=1e-3)
    assert series.spacing[1:] == pytest.approx((0.644531, 0.644531))
    z = [p[2] for p in series.positions]
    assert z == sorted(z) and z[0] == pytest.approx(-252.0) and z[-1] == pytest.approx(-204.8)
    assert [ds.ImagePositionPatient[2] for ds in series.datasets] == pytest.approx(z)
    assert series.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    # Hounsfield units: air outside the patient is about -1000 HU
    assert np.median(series.array[:, :20, :20]) < -900
    assert all("PixelData" not in ds for ds in series.datasets)
    assert all("SOPInstanceUID" in ds for ds in series.datasets)


@pytest.mark.data
def test_rider_slice_matches_its_own_rescale() -> None:
    path = rider_files()[0]
    raw = pydicom.dcmread(path)
    expected = raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept)
    series = load_series_files(rider_files(5))
    np.testing.assert_array_equal(series.array[0], expected.astype(np.float32))


@pytest.mark.data
def test_jpeg_lossless_covid_ct_decodes_to_hu() -> None:
    series = load_series_files(sorted(COVID_CT.glob("*.dcm")))
    assert series.array.shape == (30, 512, 512)
    assert series.spacing[0] == pytest.approx(2.0)
    assert series.array.min() >= -1024
    lung_fraction = np.mean((series.array > -950) & (series.array < -500))
    assert lung_fraction > 0.05  # mid-lung block: lung parenchyma is present


@pytest.mark.data
def test_lossless_transfer_syntaxes_decode_identically() -> None:
    arrays = {}
    for suffix in LOSSLESS_SYNTAXES:
        (path,) = CORNERSTONE.glob(f"*_1.2.840.10008.{suffix}.dcm")
        arrays[suffix] = load_series(two_slice_series(path)).array
    reference = arrays["1.2.1.99"]
    assert reference.min() < -900 < 0 < reference.max()
    for suffix, array in arrays.items():
        np.testing.assert_array_equal(array, reference, err_msg=suffix)


@pytest.mark.data
def test_lossy_jpeg_decodes_close_to_lossless() -> None:
    (lossy,) = CORNERSTONE.glob("*_1.2.840.10008.1.2.4.51.dcm")
    (lossless,) = CORNERSTONE.glob("*_1.2.840.10008.1.2.4.70.dcm")
    difference = (
        load_series(two_slice_series(lossy)).array - load_series(two_slice_series(lossless)).array
    )
    assert np.abs(difference).mean() < 20


@pytest.mark.data
def test_enhanced_ct_frames_come_from_functional_groups() -> None:
    series = load_series_files([ENHANCED_CT / "CT0012.not_fragmented_bot_rle.dcm"])
    assert series.array.shape == (2, 512, 512)
    assert len(series.datasets) == 1
    # normal = row x col = (-1,0,0) x (0,1,0) = (0,0,-1): frame 2 (z=-159) comes first
    assert series.frame_numbers == [2, 1]
    assert series.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    raw = pydicom.dcmread(ENHANCED_CT / "CT0012.not_fragmented_bot_rle.dcm")
    np.testing.assert_array_equal(series.array[0], raw.pixel_array[1] - 1024.0)


@pytest.mark.data
def test_monochrome1_radiograph_is_inverted_and_scaled() -> None:
    raw = pydicom.dcmread(CHEST_CR)
    stored = raw.pixel_array
    series = load_series_files([CHEST_CR], expected_modality="CR")
    image = series.array[0]
    assert series.array.shape == (1, 1955, 1841)
    assert 0.0 <= image.min() and image.max() <= 1.0
    # MONOCHROME1: the highest stored value is the darkest, so it must come out near 0
    brightest_stored = np.unravel_index(np.argmax(stored), stored.shape)
    darkest_stored = np.unravel_index(np.argmin(stored), stored.shape)
    assert image[brightest_stored] < 0.2 < 0.8 < image[darkest_stored]
    assert series.spacing == (0.0, 1.0, 1.0)  # the header's PixelSpacing is 0\0: fallback


@pytest.mark.data
def test_radiograph_window_is_applied() -> None:
    wide = load_series_files([CHEST_CR]).array[0]
    narrow_ds = pydicom.dcmread(CHEST_CR)
    narrow_ds.WindowCenter, narrow_ds.WindowWidth = 15000, 4000
    narrow = load_series([narrow_ds]).array[0]
    saturated = lambda a: np.mean((a <= 0.001) | (a >= 0.999))  # noqa: E731
    assert saturated(narrow) > saturated(wide) + 0.2


@pytest.mark.data
def test_gap_is_rejected_with_reason() -> None:
    datasets = read_all(rider_files(12))
    del datasets[6]
    with pytest.raises(SeriesError, match="gap in slice positions") as info:
        load_series(datasets)
    assert info.value.series_uid == datasets[0].SeriesInstanceUID


@pytest.mark.data
def test_mixed_orientation_is_rejected() -> None:
    datasets = read_all(rider_files(4))
    datasets[2].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(SeriesError, match="orientations"):
        load_series(datasets)


@pytest.mark.data
def test_zero_pixel_spacing_is_rejected_with_reason() -> None:
    datasets = read_all(rider_files(3))
    for ds in datasets:
        ds.PixelSpacing = [0, 0]
    with pytest.raises(SeriesError, match="PixelSpacing must be two positive numbers"):
        load_series(datasets)


@pytest.mark.data
def test_mixed_size_is_rejected() -> None:
    datasets = read_all(rider_files(3))
    small = datasets[1]
    small.PixelData = small.pixel_array[::2, ::2].tobytes()
    small.Rows, small.Columns = 256, 256
    with pytest.raises(SeriesError, match="rows/columns"):
        load_series(datasets)


@pytest.mark.data
def test_missing_pixel_data_is_rejected() -> None:
    datasets = read_all(rider_files(3))
    del datasets[1].PixelData
    with pytest.raises(SeriesError, match="no pixel data"):
        load_series(datasets)


@pytest.mark.data
def test_single_slice_ct_and_localizer_are_rejected() -> None:
    with pytest.raises(SeriesError, match="single slice"):
        load_series_files([LOCALIZER])


@pytest.mark.data
def test_same_position_twice_is_rejected_and_resent_instance_is_not() -> None:
    datasets = read_all(rider_files(3))
    clone = copy.deepcopy(datasets[1])
    assert load_series([*datasets, clone]).array.shape[0] == 3  # same SOP UID: one instance
    clone.SOPInstanceUID = generate_uid()
    with pytest.raises(SeriesError, match="same position"):
        load_series([*read_all(rider_files(3)), clone])


@pytest.mark.data
def test_modality_and_series_checks() -> None:
    with pytest.raises(SeriesError, match="expected 'CR'"):
        load_series(read_all(rider_files(2)), expected_modality="CR")
    mixed = read_all(rider_files(2))
    mixed[1].SeriesInstanceUID = generate_uid()
    with pytest.raises(SeriesError, match="more than one series"):
        load_series(mixed)
    with pytest.raises(SeriesError, match="no instances"):
        load_series([])


@pytest.mark.data
def test_600_slice_ct_stays_within_memory_budget() -> None:
    """600 x 512 x 512 float32 is 629 MB; a float64 copy of the volume would double that."""
    template = pydicom.dcmread(rider_files(1)[0])
    template.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pixel_bytes = template.PixelData  # shared by every slice: the test measures the loader
    del template.PixelData
    datasets = []
    for i in range(600):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [-160.0, -160.0, -300.0 + 0.8 * i]
        ds.PixelData = pixel_bytes
        datasets.append(ds)
    tracemalloc.start()
    try:
        series = load_series(datasets)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert series.array.shape == (600, 512, 512)
    assert peak < 800 * 2**20, f"peak {peak / 2**20:.0f} MiB"


SAMPLES = Path(__file__).resolve().parent.parent / "dicom_samples"


@pytest.mark.parametrize(
    ("folder", "modality", "frames"),
    [
        ("ct-covid_covid-ct-md-P002", "CT", 30),
        ("ct-normal_covid-ct-md-normal002", "CT", 30),
        ("cxr-covid_hannover-PA", "CR", 1),
        ("cxr-covid_hannover-AP", "CR", 1),
        ("cxr-normal_nih-cxr14-PA", "CR", 1),
    ],
)
def test_dicom_samples_load_and_are_valid(folder: str, modality: str, frames: int) -> None:
    paths = sorted((SAMPLES / folder).glob("*.dcm"))
    series = load_series_files(paths, expected_modality=modality)
    assert series.array.shape[0] == frames
    if modality == "CT":
        assert series.spacing[0] == pytest.approx(2.0)
        assert series.array.min() == -1024
    else:
        assert series.array.min() >= 0 and series.array.max() == pytest.approx(1.0, abs=0.05)
    if DCIODVFY is not None:
        assert dciodvfy_errors(paths[0]) == []


def test_spill_to_disk_keeps_the_values_and_frees_the_array():
    from covid_plugin.volume import spill_to_disk

    array = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    series = LoadedSeries("CT", "1.2", "1.3", array.copy(), (1.0, 1.0, 1.0), [])
    spill_to_disk(series)
    assert isinstance(series.array, np.memmap)
    assert series.array.dtype == np.int16 and not series.array.flags.writeable
    np.testing.assert_array_equal(series.array, array)
