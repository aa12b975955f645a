"""Reads what the node and the store need from a received instance, leaving pixel data alone.

Runs on the network thread, so it only parses the header (pixel data is deferred: pydicom
skips over it) and checks what later stages rely on; anything wrong becomes an InvalidInstance
whose message names the problem, which the listener turns into a failure status.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)


class InvalidInstance(ValueError):
    """A received dataset the node cannot use; `reason` is what gets recorded and logged."""

    def __init__(self, reason: str, sop_instance_uid: str | None = None,
                 status: int = 0xC000) -> None:
        super().__init__(f"{reason} (SOP Instance UID {sop_instance_uid or 'unknown'})")
        self.reason = reason
        self.sop_instance_uid = sop_instance_uid
        self.status = status  # the C-STORE failure status the sender gets


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying and routing attributes of one instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    modality: str
    body_part: str
    description: str
    image_type: str
    source_ae: str | None = None  # file meta (0002,0016): the AE title that sent it to us


def loggable_uid(value: str) -> str:
    """`value` as a log line may show it: a UID from the network that is not one can hold
    anything a sender put there (a patient's name, say)."""
    value = value.strip().rstrip("\x00")
    return value if len(value) <= 64 and _UID.match(value) else "(invalid UID)"


def _uid(ds: pydicom.Dataset, keyword: str, sop_uid: str | None) -> str:
    value = str(ds.get(keyword, "") or "").strip().rstrip("\x00")
    if not value:
        # 0xA900: dataset does not match SOP class
        raise InvalidInstance(f"missing required attribute {keyword}", sop_uid, 0xA900)
    if len(value) > 64 or not _UID.match(value):
        raise InvalidInstance(f"{keyword} is not a valid UID", sop_uid)
    return value


def _check_pixel_data(ds: pydicom.Dataset, size: int, transfer_syntax: UID, sop_uid: str) -> None:
    """A truncated transfer leaves a Pixel Data element that claims more bytes than arrived."""
    elem = ds._dict.get(_PIXEL_DATA)
    if elem is None:
        if any(tag in ds._dict for tag in _FLOAT_PIXEL_DATA):
            return
        raise InvalidInstance("missing Pixel Data", sop_uid)
    if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
        return  # encapsulated (undefined length): the frames' own items delimit it
    if transfer_syntax.is_encapsulated:
        # native pixels sent under a compressed transfer syntax: no decoder can read them,
        # and the job would fail long after the sender was told it was stored
        raise InvalidInstance(
            f"Pixel Data is not encapsulated (defined length) but the transfer syntax "
            f"{transfer_syntax.name} requires compressed frames", sop_uid)
    deflated = transfer_syntax == DeflatedExplicitVRLittleEndian  # offsets are post-inflate
    if not deflated and elem.value_tell is not None and elem.value_tell + elem.length > size:
        raise InvalidInstance("Pixel Data is truncated", sop_uid)
    if not transfer_syntax.is_compressed:
        try:
            expected = (
                int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8
            )
        except (AttributeError, TypeError, ValueError) as exc:
            # the exception's text can quote the value: name the module, not the value
            raise InvalidInstance("image pixel module incomplete", sop_uid) from exc
        if elem.length < expected:
            raise InvalidInstance(
                f"Pixel Data holds {elem.length} bytes, the image needs {expected}", sop_uid
            )


def _check_image_geometry(ds: pydicom.Dataset, sop_uid: str) -> None:
    """Values no decoder can use; the reasons never quote the value itself.

    PixelSpacing 0 is not refused here: real radiographs carry it for "unknown" (the NEMA
    RG1 chest CR does), and a radiograph needs no spacing. The CT loader names it instead.
    """
    try:
        for keyword in ("Rows", "Columns"):
            value = ds.get(keyword)
            if value is not None and int(value) < 1:
                raise InvalidInstance(f"{keyword} must be 1 or more", sop_uid, 0xA900)
        bits = ds.get("BitsAllocated")
        if bits is not None and int(bits) != 1 and (int(bits) < 8 or int(bits) % 8):
            raise InvalidInstance("BitsAllocated must be 1 or a multiple of 8", sop_uid)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidInstance):
            raise
        raise InvalidInstance("image pixel module has a value that is not a number",
                              sop_uid) from exc


def read_header(data: bytes, command_sop_uid: str | None = None) -> InstanceHeader:
    """Parse `data` (DICOM file format: preamble, meta, dataset) and check it is usable."""
    try:
        ds = pydicom.dcmread(BytesIO(data), defer_size=1024)
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as exc:
        raise InvalidInstance(f"dataset cannot be parsed: {exc}", command_sop_uid) from exc
    sop_uid = _uid(ds, "SOPInstanceUID", command_sop_uid)
    if command_sop_uid and sop_uid != command_sop_uid:
        raise InvalidInstance("SOP Instance UID differs from the C-STORE request's", sop_uid)
    transfer_syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    _check_image_geometry(ds, sop_uid)
    _check_pixel_data(ds, len(data), transfer_syntax, sop_uid)
    image_type = ds.get("ImageType", [])
    if isinstance(image_type, str):
        image_type = [image_type]
    return InstanceHeader(
        sop_instance_uid=sop_uid,
        sop_class_uid=_uid(ds, "SOPClassUID", sop_uid),
        series_uid=_uid(ds, "SeriesInstanceUID", sop_uid),
        study_uid=_uid(ds, "StudyInstanceUID", sop_uid),
        transfer_syntax=str(transfer_syntax),
        modality=str(ds.get("Modality", "") or "").upper(),
        body_part=str(ds.get("BodyPartExamined", "") or "").upper(),
        description=" ".join(
            str(ds.get(k, "") or "")
            for k in ("StudyDescription", "SeriesDescription", "ProtocolName")
        ).strip(),
        image_type="\\".join(str(v) for v in image_type).upper(),
        source_ae=str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "").strip()
        or None,
    )
