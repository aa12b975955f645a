"""The real Hounsfield-unit CT series in the shared data, as (hu, spacing) volumes.

Training and evaluation read the staged DICOM folders directly with pydicom (the node has its own
loader in covid_plugin.volume); only axial ORIGINAL slices are kept, so the NY-SBU coronal and
sagittal reformats do not end up stacked with their axial slice.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

# series folders (relative to the data root) with HU CT used by the CT models, and what each is
HU_SERIES = {
    "ct_hu/dicom/covid-ct-md_P002": "covid",
    "ct_hu/dicom/covid-ct-md_cap002": "pneumonia_other",
    "ct_hu/dicom/covid-ct-md_normal002": "normal",
    "ct_hu/dicom/tcia-lung-pet-ct-dx_Lung_Dx-A0001": "lung_cancer",
    "ct_hu/dicom/tcia-lung-pet-ct-dx_Lung_Dx-A0002": "lung_cancer",
    "dicom/tcia-rider-pilot_0117_chest-ct-nsclc": "lung_cancer",
    "dicom/tcia-covid19-ny-sbu_A098752_chest-ct-1901": "covid",
    "dicom/tcia-covid19-ny-sbu_A072894_chest-ct-1901": "covid",
}

# the six whole-chest COVID-CT-MD series (every second slice, 4 mm), one per patient
FULL_SERIES = {
    "ct_hu/covid-ct-md-series/P001": "covid",
    "ct_hu/covid-ct-md-series/P002": "covid",
    "ct_hu/covid-ct-md-series/cap001": "pneumonia_other",
    "ct_hu/covid-ct-md-series/cap002": "pneumonia_other",
    "ct_hu/covid-ct-md-series/normal001": "normal",
    "ct_hu/covid-ct-md-series/normal002": "normal",
}

SOURCES = {
    "covid-ct-md": ("COVID-CT-MD (Afshar et al., Sci Data 8:121, 2021)", "CC-BY-4.0 (unverified)"),
    "tcia-lung-pet-ct-dx": ("TCIA Lung-PET-CT-Dx, doi:10.7937/TCIA.2020.NNC2-0461", "CC-BY-4.0"),
    "tcia-rider-pilot": ("TCIA RIDER Pilot, doi:10.7937/m87f-mz83", "CC-BY-4.0"),
    "tcia-covid19-ny-sbu": ("TCIA COVID-19-NY-SBU, doi:10.7937/TCIA.BBAG-2923", "CC-BY-4.0"),
}


@dataclass
class HuSeries:
    """One axial series: HU volume sorted along the slice normal, spacing (slice, row, col) mm."""

    name: str  # the study folder name (source + de-identified subject, no patient names)
    label: str
    hu: np.ndarray
    spacing: tuple[float, float, float]
    positions_z: list[float]


def _is_axial(ds: pydicom.Dataset) -> bool:
    row, col = np.array(ds.ImageOrientationPatient[:3]), np.array(ds.ImageOrientationPatient[3:])
    return abs(np.cross(row, col)[2]) > 0.9


def read_series(folder: Path) -> tuple[np.ndarray, tuple[float, float, float], list[float]]:
    """Read one folder of CT slices into float32 HU, sorted by position along the slice normal."""
    slices = []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        if not _is_axial(ds) or "LOCALIZER" in [str(v) for v in ds.get("ImageType", [])]:
            continue
        orient = np.array(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(orient[:3], orient[3:])
        slices.append((float(np.dot(normal, np.array(ds.ImagePositionPatient, float))), ds))
    if not slices:
        raise ValueError(f"no axial CT slices in {folder.name}")
    slices.sort(key=lambda item: item[0])
    positions = [pos for pos, _ in slices]
    hu = np.stack([
        ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for _, ds in slices
    ])
    first = slices[0][1]
    if len(slices) > 1:
        slice_spacing = float(np.median(np.diff(positions)))
    else:
        slice_spacing = float(first.get("SliceThickness", 1.0))
    row_sp, col_sp = (float(v) for v in first.PixelSpacing)
    return hu, (slice_spacing, row_sp, col_sp), positions


def load_hu_series(data: Path, names: list[str] | None = None,
                   which: dict[str, str] | None = None) -> list[HuSeries]:
    """Every HU series the CT models use (or the named folders), with its series-level label."""
    out = []
    for rel, label in (which or HU_SERIES).items():
        if names is not None and Path(rel).name not in names:
            continue
        hu, spacing, z = read_series(data / rel)
        out.append(HuSeries(Path(rel).name, label, hu, spacing, z))
    return out


def series_slice_labels(data: Path) -> dict[str, dict[float, int]]:
    """Radiologists' per-slice infection labels of the whole COVID-CT-MD series, by subject and
    slice z (PROVENANCE.md: label index = InstanceNumber order); blank (normals) reads as 0."""
    labels: dict[str, dict[float, int]] = defaultdict(dict)
    with open(data / "ct_hu" / "covid_ct_md_series_labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            value = row["infection"]
            labels[row["subject"]][round(float(row["position_z"]), 1)] = int(value) if value else 0
    return dict(labels)
