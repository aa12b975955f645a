"""Findings -> one RGB Secondary Capture that any viewer shows without SR or SEG support.

For a radiograph: the image with the model's heatmap colour-blended on it. For a CT: the key
slice (largest lesion area) in a lung window with lung and lesion contours. Below the image, a
banner with the findings and "RESEARCH USE ONLY" is burned in, so the caveat travels with the
pixels even when the object is printed or exported as a picture.
"""

from __future__ import annotations

import textwrap

import highdicom as hd
import numpy as np
from highdicom.spatial import get_closest_patient_orientation
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from skimage.segmentation import find_boundaries

from covid_plugin.findings import Findings, Mask
from covid_plugin.outputs.codes import ANATOMY_CATEGORIES
from covid_plugin.outputs.seg import segment_colours
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.volume import LoadedSeries

LUNG_WINDOW = (-600.0, 1500.0)  # centre, width in HU
HEATMAP_ALPHA = 0.45
HEATMAP_FLOOR = 0.2  # heat below this is not drawn, so the image stays readable
# A blue -> cyan -> yellow -> red ramp; anchors at heat 0, 1/3, 2/3, 1.
HEATMAP_ANCHORS = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], float)
BANNER_COLOUR = (255, 255, 0)
# How a frontal chest radiograph is conventionally displayed, for headers that do not say.
DEFAULT_RADIOGRAPH_ORIENTATION = ("L", "F")
CAVEAT = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"


def key_frame(masks: list[Mask], n_frames: int) -> int:
    """Frame with the largest lesion area; else the largest anatomy area; else the middle one."""
    for wanted_anatomy in (False, True):
        chosen = [m for m in masks if (m.category.value in ANATOMY_CATEGORIES) == wanted_anatomy]
        if chosen:
            area = sum(m.array.reshape(n_frames, -1).sum(axis=1) for m in chosen)
            if area.max() > 0:
                return int(np.argmax(area))
    return n_frames // 2


def summary_lines(findings: Findings) -> list[str]:
    """The findings as short text lines, most important first."""
    lines = [CAVEAT]
    c = findings.classification
    if c is not None:
        probabilities = ", ".join(f"{p.code.meaning} {p.probability:.0%}" for p in c.probabilities)
        predicted = next(p for p in c.probabilities if p.key == c.predicted)
        lines.append(f"Result: {predicted.code.meaning} ({probabilities})")
    labels = {mask.key: mask.label for mask in findings.masks}
    for m in findings.measurements:
        about = f" ({labels[m.mask_key]})" if m.mask_key in labels else ""
        lines.append(f"{m.name.meaning}{about}: {m.value:.1f} {m.unit.value}")
    lines.extend(findings.notes)
    models = findings.models or ([c.model] if c is not None else [])
    if models:
        lines.append("Models: " + ", ".join(f"{m.name} {m.version}" for m in models))
    return lines


def build_secondary_capture(
    findings: Findings, series: LoadedSeries, settings: OutputSettings
) -> hd.sc.SCImage:
    """The overlay picture for one pipeline run, in a new series of the source study."""
    n_frames = series.array.shape[0]
    frame = key_frame(findings.masks, n_frames) if series.modality == "CT" else 0
    grey = _display(series, frame)
    longer = max(grey.shape)
    scale = min(max(1.0, settings.sc_min_size / longer), settings.sc_max_size / longer)
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    base = Image.fromarray((grey * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    rgb = np.repeat(np.asarray(base)[..., None], 3, axis=-1).astype(np.float32)
    if findings.heatmap is not None and series.modality != "CT":
        rgb = _blend_heatmap(rgb, findings.heatmap[frame], size)
    for mask, colour in zip(findings.masks, segment_colours(findings.masks), strict=True):
        outline = _resized_mask(mask.array[frame], size)
        rgb[find_boundaries(outline, mode="inner")] = colour
    lines = summary_lines(findings)
    if series.modality == "CT":
        lines.insert(1, f"Key slice {frame + 1} of {n_frames}")
    picture = _with_banner(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), lines)
    source = series.datasets[0 if series.frame_numbers is not None else frame]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.asarray(picture),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=hd.UID(),
        series_number=settings.sc_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        patient_orientation=_patient_orientation(series, source),
        series_description="AI overlay (research use only)",
    )
    # An unpaired body part is what lets General Series go without Laterality (Type 2C).
    sc.BodyPartExamined = "CHEST"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = CAVEAT
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = "Overlay of automatic findings on the source image"
    sc.SourceImageSequence = [_source_reference(source, series, frame)]
    return sc


def _patient_orientation(series: LoadedSeries, source: Dataset) -> tuple[str, str]:
    """Row and column directions of the picture, which keeps the source frame's orientation."""
    if series.orientation is not None:
        row, col = np.array(series.orientation[:3]), np.array(series.orientation[3:])
        directions = np.stack([row, col, np.cross(row, col)], axis=1)
        along_row, along_col, _ = get_closest_patient_orientation(directions)
        return along_row.value, along_col.value
    if source.get("PatientOrientation") and len(source.PatientOrientation) == 2:
        return str(source.PatientOrientation[0]), str(source.PatientOrientation[1])
    return DEFAULT_RADIOGRAPH_ORIENTATION


def _source_reference(source: Dataset, series: LoadedSeries, frame: int) -> Dataset:
    """Source Image Sequence item: the slice (or frame) the picture was made from."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if series.frame_numbers is not None:
        item.ReferencedFrameNumber = series.frame_numbers[frame]
    return item


def _display(series: LoadedSeries, frame: int) -> np.ndarray:
    """A frame in [0, 1] as a reader would see it: lung window for CT, as loaded for CR/DX."""
    image = series.array[frame]
    if series.modality != "CT":
        return np.clip(image, 0.0, 1.0)
    centre, width = LUNG_WINDOW
    return np.clip((image - (centre - width / 2)) / width, 0.0, 1.0)


def _blend_heatmap(rgb: np.ndarray, heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    small = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize(size))
    small = np.clip(small, 0.0, 1.0)
    positions = np.linspace(0.0, 1.0, len(HEATMAP_ANCHORS))
    colour = np.stack(
        [np.interp(small, positions, HEATMAP_ANCHORS[:, c]) for c in range(3)], axis=-1
    )
    alpha = np.where(small >= HEATMAP_FLOOR, HEATMAP_ALPHA, 0.0)[..., None]
    return rgb * (1 - alpha) + colour * alpha


def _resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape[::-1] == size:
        return mask.astype(bool)
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    return np.asarray(image) > 127


def _with_banner(picture: Image.Image, lines: list[str]) -> Image.Image:
    """The picture with the text lines burned into a black band below it."""
    font_size = max(12, picture.width // 48)
    font = ImageFont.load_default(size=font_size)
    line_height = int(font_size * 1.3)
    width_in_chars = max(20, int(picture.width / (font_size * 0.6)))
    lines = [part for line in lines for part in textwrap.wrap(line, width_in_chars)]
    canvas = Image.new("RGB", (picture.width, picture.height + line_height * len(lines) + 8))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, picture.height + 4 + i * line_height), line, fill=BANNER_COLOUR, font=font)
    return canvas
