"""Findings -> one RGB Secondary Capture that any viewer shows without SR or SEG support.

For a radiograph: the image with the lung and region outlines and, when the call is not
"normal", the heatmap of the called class colour-blended on it. For a CT: the key slice
(largest lesion area) in a lung window with lung and lesion outlines. Below the image, a banner
is burned in: "RESEARCH USE ONLY", the findings, the decision threshold, the key image as
viewers number it, a colour legend of the outlines and a colour scale for the heatmap, so the
picture explains itself even when printed or exported.
"""

from __future__ import annotations

import datetime
import textwrap

import highdicom as hd
import numpy as np
from highdicom.spatial import get_closest_patient_orientation
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from skimage.segmentation import find_boundaries

from covid_plugin.findings import Findings
from covid_plugin.outputs.colours import RGB, segment_colours
from covid_plugin.outputs.headers import creation_times, models_of, stamp
from covid_plugin.outputs.regions import is_anatomy, key_image_label, key_image_of
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.outputs.text import CAVEAT, summary_lines
from covid_plugin.volume import LoadedSeries

LUNG_WINDOW = (-600.0, 1500.0)  # centre, width in HU
HEATMAP_ALPHA = 0.45
HEATMAP_FLOOR = 0.2  # heat below this is not drawn, so the image stays readable
# A blue -> cyan -> yellow -> red ramp; anchors at heat 0, 1/3, 2/3, 1.
HEATMAP_ANCHORS = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], float)
BANNER_COLOUR = (255, 255, 0)
# How a frontal chest radiograph is conventionally displayed, for headers that do not say.
DEFAULT_RADIOGRAPH_ORIENTATION = ("L", "F")
NORMAL_KEY = "normal"  # the call whose heatmap would explain nothing the reader looks for


def build_secondary_capture(
    findings: Findings,
    series: LoadedSeries,
    settings: OutputSettings,
    when: datetime.datetime | None = None,
    frame: int | None = None,
) -> hd.sc.SCImage:
    """The overlay picture for one pipeline run, in a new series of the source study."""
    when = when or datetime.datetime.now()
    frame = key_image_of(findings, series) if frame is None else frame
    grey = _display(series, frame)
    longer = max(grey.shape)
    scale = min(max(1.0, settings.sc_min_size / longer), settings.sc_max_size / longer)
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    base = Image.fromarray((grey * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    rgb = np.repeat(np.asarray(base)[..., None], 3, axis=-1).astype(np.float32)
    lines = summary_lines(findings, _key_slice(findings, series, frame))
    heat_caption = None
    if findings.heatmap is not None and series.modality != "CT":
        c = findings.classification
        if c is not None and c.predicted != NORMAL_KEY:
            called = next(p.code.meaning for p in c.probabilities if p.key == c.predicted)
            rgb = _blend_heatmap(rgb, findings.heatmap[frame], size)
            heat_caption = f"Heatmap: image areas behind the {called} call (Grad-CAM)"
        else:  # a heatmap of "normal" would show nothing a reader looks for
            at = len(lines) - 1 if lines[-1].startswith("Models:") else len(lines)
            lines.insert(at, "No heatmap drawn: no abnormal call to explain")
    colours = segment_colours(findings.masks)
    for mask, colour in zip(findings.masks, colours, strict=True):
        outline = _resized_mask(mask.array[frame], size)
        rgb[find_boundaries(outline, mode="inner")] = colour
    legend = [(mask.label, colour) for mask, colour in zip(findings.masks, colours, strict=True)]
    picture = _with_banner(
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), lines, legend, heat_caption
    )
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
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=settings.sc_series_description,
        **creation_times(when),
    )
    # An unpaired body part is what lets General Series go without Laterality (Type 2C).
    sc.BodyPartExamined = "CHEST"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = CAVEAT
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = "Overlay of automatic findings on the source image"
    sc.SourceImageSequence = [_source_reference(source, series, frame)]
    if source.get("StudyDescription"):  # highdicom's SC copies no General Study description
        sc.StudyDescription = source.StudyDescription
    return stamp(sc, models_of(findings), settings, when)


def _key_slice(findings: Findings, series: LoadedSeries, frame: int) -> str | None:
    """'image 27, z = -331.7 mm (largest lesion area)' for a CT, None for a radiograph."""
    if series.modality != "CT":
        return None
    lesion = any(m.array[frame].any() for m in findings.masks if not is_anatomy(m))
    why = "largest lesion area" if lesion else "no lesion; largest lung area"
    return f"{key_image_label(series, frame)} ({why})"


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


def _with_banner(
    picture: Image.Image,
    lines: list[str],
    legend: list[tuple[str, RGB]],
    heat_caption: str | None,
) -> Image.Image:
    """The picture with the text, the outline legend and the heat scale in a band below it."""
    font_size = max(12, picture.width // 48)
    font = ImageFont.load_default(size=font_size)
    line_height = int(font_size * 1.3)
    width_in_chars = max(20, int(picture.width / (font_size * 0.6)))
    lines = [part for line in lines for part in textwrap.wrap(line, width_in_chars)]
    rows = len(lines) + (1 if legend else 0) + (2 if heat_caption else 0)
    canvas = Image.new("RGB", (picture.width, picture.height + line_height * rows + 8))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = picture.height + 4
    for line in lines:
        draw.text((4, y), line, fill=BANNER_COLOUR, font=font)
        y += line_height
    if legend:
        x = 4
        for label, colour in legend:
            draw.rectangle((x, y + 2, x + font_size, y + 2 + font_size), fill=colour)
            draw.text((x + font_size + 4, y), label, fill=colour, font=font)
            x += font_size + 16 + int(draw.textlength(label, font=font))
        y += line_height
    if heat_caption:
        draw.text((4, y), heat_caption, fill=BANNER_COLOUR, font=font)
        y += line_height
        _draw_heat_scale(draw, y, picture.width, font, font_size)
    return canvas


def _draw_heat_scale(
    draw: ImageDraw.ImageDraw, y: int, width: int, font: ImageFont.ImageFont, font_size: int
) -> None:
    """A horizontal colour bar from the lowest drawn heat ("low") to the highest ("high")."""
    low_width = int(draw.textlength("low ", font=font))
    left, right = 4 + low_width, max(4 + low_width + 10, width // 2)
    positions = np.linspace(0.0, 1.0, len(HEATMAP_ANCHORS))
    for x in range(left, right):
        level = HEATMAP_FLOOR + (1 - HEATMAP_FLOOR) * (x - left) / max(1, right - left - 1)
        colour = tuple(int(np.interp(level, positions, HEATMAP_ANCHORS[:, c])) for c in range(3))
        draw.line((x, y + 2, x, y + font_size), fill=colour)
    draw.text((4, y), "low", fill=BANNER_COLOUR, font=font)
    draw.text((right + 4, y), "high", fill=BANNER_COLOUR, font=font)
