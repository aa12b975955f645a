"""Recreate dicom_samples/ from ../shared/data, so that every sample's provenance is reproducible.

    .venv/bin/python dicom_samples/make_samples.py [--data ../shared/data]

Two kinds of sample (README.md lists every file, its source and licence):
- chest CT series from COVID-CT-MD (CC BY 4.0): source files kept, pixel data byte for byte
  (JPEG lossless); only identifiers that are not valid DICOM are repaired (see `repair_ct`);
- chest radiographs: there is no labelled chest X-ray as DICOM, so real images (ieee8023
  CC BY 4.0 rows, NIH ChestX-ray14 CC0) are wrapped into CR objects with a generated header,
  marked DERIVED, losslessly RLE-compressed. Each carries the patient's age from the manifest
  (the CXR product is for adults and declines a film without one) and, where the source
  states the physical size of its original, the ImagerPixelSpacing of the staged pixels.
UIDs are derived from the sources, so running the script twice gives identical files.
Patient IDs use '-' where the manifest has ':', so that they need no escaping in a URL
(Orthanc's DICOMweb plugin does not decode '%3A' and loses such studies).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("COVID_PLUGIN_DATA", HERE.parent.parent / "shared" / "data"))
LICENCES = {"CC-BY-4.0", "CC-BY-3.0", "CC0-1.0", "MIT"}


@dataclass(frozen=True)
class CTSample:
    folder: str  # under shared/data/ct_hu/dicom
    out: str
    description: str


@dataclass(frozen=True)
class OriginalSize:
    """The source's statement of its original image: columns, rows and pixel spacing (mm)."""

    columns: int
    rows: int
    spacing_mm: float
    citation: str


@dataclass(frozen=True)
class CXRSample:
    path: str  # manifest path, relative to shared/data
    manifest: str
    out: str
    view: str
    original: OriginalSize | None = None  # None: the source gives no physical size


CT_SAMPLES = (
    CTSample("covid-ct-md_P002", "ct-covid_covid-ct-md-P002", "COVID-19"),
    CTSample("covid-ct-md_normal002", "ct-normal_covid-ct-md-normal002", "normal"),
)
CXR_SAMPLES = (
    CXRSample(
        "cxr/images/ieee8023/covid/41182_2020_203_Fig5_HTML.jpg", "cxr", "cxr-covid_ieee8023-PA",
        "PA",
    ),
    CXRSample(
        "cxr/images/ieee8023/covid/40779_2020_233_Fig2_HTML-a.jpg", "cxr",
        "cxr-covid_ieee8023-PA-2", "PA",
    ),
    CXRSample(
        "cxr_adult/images/nih/00000005_000.jpg", "cxr_adult", "cxr-normal_nih-cxr14-PA", "PA",
        # NIH Data_Entry_2017 (v2020 revision) row 00000005_000.png: OriginalImage[Width,
        # Height] 2048 x 2500, OriginalImagePixelSpacing 0.168 mm. NIH resized every image to
        # 1024 x 1024 and the stagers to 320 x 320, both without keeping the aspect ratio.
        OriginalSize(2048, 2500, 0.168, "NIH ChestX-ray14 Data_Entry_2017_v2020"),
    ),
)


def manifest_rows(data: Path, folder: str) -> dict[str, dict[str, str]]:
    with open(data / folder / "manifest.csv", newline="") as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def url_safe_id(source_id: str) -> str:
    """The manifest's '<source>:<id>' with '-' for ':', e.g. 'nih_cxr14-5'."""
    return source_id.replace(":", "-")


def imager_pixel_spacing(original: OriginalSize, rows: int, columns: int) -> list[float]:
    """Row and column spacing (mm) of the staged pixels: the original's extent over them."""
    return [
        round(original.rows * original.spacing_mm / rows, 4),
        round(original.columns * original.spacing_mm / columns, 4),
    ]


def valid_uid(value: str, *entropy: str) -> str:
    """A valid UID for a source value: kept if valid, the PS3.5 B.2 form of a UUID, else new."""
    value = str(value or "")
    if value and all(part.isdigit() for part in value.split(".")) and len(value) <= 64:
        return value
    try:
        return f"2.25.{uuid.UUID(value).int}"
    except ValueError:
        return generate_uid(entropy_srcs=[*entropy, value])


def repair_ct(ds: Dataset, subject: str, description: str) -> None:
    """Make a COVID-CT-MD header valid DICOM without touching pixels, patient or geometry.

    The "...002" sources carry UUIDs as Study/Series UIDs (invalid VR UI), empty SOP Instance
    and Frame of Reference UIDs, references to images that are not distributed, and no
    PatientName or PatientBirthDate (both Type 2).
    """
    ds.StudyInstanceUID = valid_uid(ds.StudyInstanceUID, subject, "study")
    ds.SeriesInstanceUID = valid_uid(ds.SeriesInstanceUID, subject, "series")
    ds.SOPInstanceUID = valid_uid(ds.SOPInstanceUID, subject, str(ds.InstanceNumber))
    ds.FrameOfReferenceUID = valid_uid(ds.FrameOfReferenceUID, subject, "frame of reference")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("ReferencedImageSequence", "SourceImageSequence", "DigitalSignatureUID"):
        if keyword in ds:
            delattr(ds, keyword)
    if "PatientName" not in ds:  # Type 2; the source's anonymous subject id stands in
        ds.PatientName = ds.PatientID
    ds.PatientBirthDate = ds.get("PatientBirthDate", "")
    ds.SeriesNumber = ds.SeriesNumber or 1
    ds.StudyDescription = ds.StudyDescription or "Chest CT (COVID-CT-MD sample)"
    ds.SeriesDescription = ds.SeriesDescription or f"Chest CT 2 mm, {description} (30 slices)"


def make_ct(data: Path, sample: CTSample, out_root: Path) -> list[dict[str, str]]:
    rows = manifest_rows(data, "ct_hu")
    subject = sample.folder.split("_", 1)[1]
    out = out_root / sample.out
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for source in sorted((data / "ct_hu" / "dicom" / sample.folder).glob("*.dcm")):
        row = rows[f"ct_hu/dicom/{sample.folder}/{source.name}"]
        assert row["licence"] in LICENCES, row
        ds = pydicom.dcmread(source)
        repair_ct(ds, subject, sample.description)
        target = out / source.name
        ds.save_as(target, enforce_file_format=True)
        records.append(record(target, row, source, "header repaired; pixel data unchanged"))
    return records


def make_cxr(data: Path, sample: CXRSample, out_root: Path) -> list[dict[str, str]]:
    """A real radiograph (8-bit JPEG, as displayed) in a generated CR header."""
    row = manifest_rows(data, sample.manifest)[sample.path]
    assert row["licence"] in LICENCES, row
    assert row["view"] == sample.view, row
    source = data / sample.path
    pixels = np.asarray(Image.open(source).convert("L"))
    patient = url_safe_id(row["patient_id"])  # the source's anonymous id, e.g. "nih_cxr14-5"
    assert row["age"] and float(row["age"]) >= 18, row  # adults only: the product's population

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[row["sha256"], "instance"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[row["sha256"], "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[row["sha256"], "series"])
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Modality = "CR"
    ds.PatientName = patient.replace("-", "^", 1)
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = row["sex"] or ""
    ds.PatientAge = f"{int(float(row['age'])):03d}Y"
    ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = f"Chest X-ray ({row['source']} sample, derived)"
    ds.SeriesDescription = f"Chest {sample.view}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = ""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = sample.view
    ds.PatientOrientation = ["L", "F"]  # the source image is stored as conventionally displayed
    if sample.original is not None:
        ds.ImagerPixelSpacing = imager_pixel_spacing(sample.original, *pixels.shape)
    spacing = (
        f"; ImagerPixelSpacing from {sample.original.citation}"
        if sample.original is not None
        else "; no physical pixel size in the source"
    )
    ds.DerivationDescription = (
        f"Wrapped from {row['source']} image {row['source_id']} (8-bit JPEG, resized by the "
        f"data stagers); real pixels, generated header{spacing}"
    )[:1024]
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter = 127.5
    ds.WindowWidth = 256
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.set_pixel_data(pixels, "MONOCHROME2", 8, generate_instance_uid=False)
    ds.compress(RLELossless, generate_instance_uid=False)

    out = out_root / sample.out
    out.mkdir(parents=True, exist_ok=True)
    target = out / "CR000001.dcm"
    ds.save_as(target, enforce_file_format=True)
    return [record(target, row, source, "wrapped into a generated CR header (DERIVED)")]


def record(target: Path, row: dict[str, str], source: Path, change: str) -> dict[str, str]:
    return {
        "path": target.relative_to(HERE).as_posix(),
        "source_path": row["path"],
        "source": row["source"],
        "patient_id": row["patient_id"],
        "label": row["label"],
        "licence": row["licence"],
        "source_sha256": sha256(source),
        "change": change,
        "sha256": sha256(target),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    records = []
    for ct in CT_SAMPLES:
        records.extend(make_ct(args.data, ct, HERE))
    for cxr in CXR_SAMPLES:
        records.extend(make_cxr(args.data, cxr, HERE))
    with open(HERE / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    total = sum((HERE / r["path"]).stat().st_size for r in records)
    print(f"{len(records)} files, {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
