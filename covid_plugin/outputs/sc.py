"""Findings -> one RGB Secondary Capture that any viewer shows without SR or SEG support.

For a radiograph: the image with the lung and region outlines and, when the call is not
"normal", the region where the called class's heatmap is highest (the top 15 % of the lungs,
tinted and outlined; not a wash over both lungs, which would look diagnostic and localise
nothing). For a CT: the
key slice (largest lesion area) in a lung window with lung and lesion outlines.
"RESEARCH USE ONLY" is burned into the image itself, at its bottom edge, so that it stays in
view when a viewer zooms or pans; nothing is written along the top, where viewers put their
own controls (OHIF's cine bar). Below the image, a banner: the findings, the decision
threshold in words, the key image as viewers number it, and a colour legend, so the picture
explains itself even when printed or exported.
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
from covid_plugin.outputs.regions import (
    is_anatomy,
    key_image_label,
    key_image_of,
    radiograph_orientation,
)
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.outputs.text import CAVEAT, summary_lines
from covid_plugin.volume import LoadedSeries

LUNG_WINDOW = (-600.0, 1500.0)  # centre, width in HU
# The heatmap (normalised to its peak by the pipeline, zero outside the lungs) is drawn only
# in its top region, tinted and outlined: the highest HEAT_TOP_SHARE of the lungs' area, and
# nowhere below HEAT_FLOOR of the peak. A Grad-CAM is often broad; its top still localises.
HEAT_TOP_SHARE = 0.15
HEAT_FLOOR = 0.6
HEAT_COLOUR = (0, 230, 255)  # cyan: apart from the lungs' green and the region's orange
HEAT_ALPHA = 0.35
BANNER_COLOUR = (255, 255, 0)
NORMAL_KEY = "normal"  # the call whose heatmap would explain nothing the reader looks for


def build_secondary_capture(
    findings: Findings,
    series: LoadedSeries,
    settings: OutputSettings,
    when: datetime.datetime | None = None,
    frame: int | None = None,
    carriers: str | None = None,
) -> hd.sc.SCImage:
    """The overlay picture for one pipeline run, in a new series of the source study;
    `carriers` (which result object carries what) is written below the findings."""
    when = when or datetime.datetime.now()
    frame = key_image_of(findings, series) if frame is None else frame
    grey = _display(series, frame)
    # drawn with the source's physical aspect (a film's pixels need not be square): the
    # picture's own pixels are square, which is how every viewer shows a secondary capture
    row_mm, column_mm = float(series.spacing[1]), float(series.spacing[2])
    finer = min(row_mm, column_mm)
    height, width = grey.shape[0] * row_mm / finer, grey.shape[1] * column_mm / finer
    longer = max(height, width)
    scale = min(max(1.0, settings.sc_min_size / longer), settings.sc_max_size / longer)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = Image.fromarray((grey * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    rgb = np.repeat(np.asarray(base)[..., None], 3, axis=-1).astype(np.float32)
    lines = summary_lines(findings, _key_slice(findings, series, frame))
    if carriers:
        lines.append(carriers)
    legend: list[tuple[str, RGB]] = []
    if findings.heatmap is not None and series.modality != "CT":
        c = findings.classification
        if c is not None and c.predicted != NORMAL_KEY:
            called = next(p.code.meaning for p in c.probabilities if p.key == c.predicted)
            rgb = _draw_heat_region(rgb, findings.heatmap[frame], size)
            legend.append(
                (f"top {HEAT_TOP_SHARE:.0%} of the lungs by the {called} heatmap (Grad-CAM)",
                 HEAT_COLOUR)
            )
        else:  # a heatmap of "normal" would show nothing a reader looks for
            at = len(lines) - 1 if lines[-1].startswith("Models:") else len(lines)
            lines.insert(at, "No heatmap drawn: no abnormal call to explain")
    colours = segment_colours(findings.masks)
    for mask, colour in zip(findings.masks, colours, strict=True):
        outline = _resized_mask(mask.array[frame], size)
        rgb[find_boundaries(outline, mode="inner")] = colour
    legend = [
        *((mask.label, colour) for mask, colour in zip(findings.masks, colours, strict=True)),
        *legend,
    ]
    picture = _with_caveat(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)))
    picture = _with_banner(picture, [line for line in lines if line != CAVEAT], legend)
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
    return radiograph_orientation(series)


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


def _draw_heat_region(rgb: np.ndarray, heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The heatmap's top region tinted and outlined; the rest of the image untouched."""
    small = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize(size))
    inside = small[small > 0]
    if inside.size == 0:
        return rgb
    top = small >= max(HEAT_FLOOR, float(np.quantile(inside, 1 - HEAT_TOP_SHARE)))
    if not top.any():
        return rgb
    tinted = rgb.copy()
    tinted[top] = rgb[top] * (1 - HEAT_ALPHA) + np.array(HEAT_COLOUR, float) * HEAT_ALPHA
    tinted[find_boundaries(top, mode="inner")] = HEAT_COLOUR
    return tinted


def _resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape[::-1] == size:
        return mask.astype(bool)
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    return np.asarray(image) > 127


def _with_caveat(picture: Image.Image) -> Image.Image:
    """CAVEAT burned into the image's bottom left corner on a dark box, legible on any film."""
    font_size = max(12, picture.width // 40)
    font = ImageFont.load_default(size=font_size)
    draw = ImageDraw.Draw(picture)
    left, top, right, bottom = draw.textbbox((0, 0), CAVEAT, font=font)
    x, y = 4, picture.height - (bottom - top) - 8
    draw.rectangle((x - 2, y - 2, x + right - left + 2, y + bottom - top + 4), fill=(0, 0, 0))
    draw.text((x - left, y - top), CAVEAT, fill=BANNER_COLOUR, font=font)
    return picture


def _with_banner(
    picture: Image.Image, lines: list[str], legend: list[tuple[str, RGB]]
) -> Image.Image:
    """The picture with the text and the colour legend (one entry a line) in a band below."""
    font_size = max(12, picture.width // 48)
    font = ImageFont.load_default(size=font_size)
    line_height = int(font_size * 1.3)
    width_in_chars = max(20, int(picture.width / (font_size * 0.6)))
    lines = [part for line in lines for part in textwrap.wrap(line, width_in_chars)]
    canvas = Image.new(
        "RGB", (picture.width, picture.height + line_height * (len(lines) + len(legend)) + 8)
    )
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = picture.height + 4
    for line in lines:
        draw.text((4, y), line, fill=BANNER_COLOUR, font=font)
        y += line_height
    for label, colour in legend:
        draw.rectangle((4, y + 2, 4 + font_size, y + 2 + font_size), fill=colour)
        draw.text((8 + font_size, y), label, fill=colour, font=font)
        y += line_height
    return canvas
