"""The shipped samples are what a PACS and a web viewer can take as they are."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import pydicom
import pytest

from covid_plugin.volume import load_series_files

SAMPLES = Path(__file__).resolve().parent.parent / "dicom_samples"
FILES = sorted(SAMPLES.glob("*/*.dcm"))
RADIOGRAPHS = sorted(SAMPLES.glob("cxr-*/*.dcm"))
URL_SAFE = re.compile(r"^[A-Za-z0-9._~^-]+$")  # RFC 3986 unreserved characters (and '^')


def test_patient_ids_need_no_url_escaping() -> None:
    """Orthanc's DICOMweb plugin does not decode '%3A': a ':' in an ID loses the study."""
    ids = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in FILES}
    assert ids and all(URL_SAFE.match(i) for i in ids), ids


@pytest.mark.parametrize("path", RADIOGRAPHS, ids=lambda p: p.parent.name)
def test_radiographs_carry_an_adult_age(path: Path) -> None:
    age = str(pydicom.dcmread(path, stop_before_pixels=True).get("PatientAge", ""))
    assert re.fullmatch(r"\d{3}Y", age) and int(age[:3]) >= 18, age


def test_nih_radiograph_has_the_pixel_spacing_its_source_states() -> None:
    path = SAMPLES / "cxr-normal_nih-cxr14-PA" / "CR000001.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert [float(v) for v in ds.ImagerPixelSpacing] == pytest.approx([1.3125, 1.0752])
    series = load_series_files([path])
    assert series.spacing[1:] == pytest.approx((1.3125, 1.0752))


def test_manifest_lists_every_file_with_its_hash() -> None:
    with open(SAMPLES / "manifest.csv", newline="") as fh:
        rows = {row["path"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {p.relative_to(SAMPLES).as_posix() for p in FILES}
    for path in FILES:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert rows[path.relative_to(SAMPLES).as_posix()]["sha256"] == digest, path
