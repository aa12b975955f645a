"""Radiograph findings -> a Grayscale Softcopy Presentation State with outlines and a caption.

For a projection radiograph this is the overlay PACS viewers widely show: the film itself,
with the lung outlines (each lung named by side, as in the SR) and the region that drove the
call drawn as graphics on named layers (each in its segment's colour), and the result as a
text object. Unlike a SEG it needs no
patient frame of reference, which a radiograph does not have.
"""

from __future__ import annotations

import datetime

import highdicom as hd

from covid_plugin.findings import Findings
from covid_plugin.outputs.colours import segment_colours
from covid_plugin.outputs.headers import creation_times, models_of, stamp
from covid_plugin.outputs.regions import Outline
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.outputs.text import result_line
from covid_plugin.volume import LoadedSeries

CAPTION_LAYER = "AI_RESULT"
LAYER_NAMES = {"suspicious_region": "REGION"}  # layer names are at most 16 characters


def _side_label(outline: Outline) -> hd.pr.TextObject:
    """'Right lung' written inside the top of a lung's outline, as the SR names it."""
    column = float(outline.points[:, 0].mean())
    top = float(outline.points[:, 1].min())
    height = float(outline.points[:, 1].max()) - top
    return hd.pr.TextObject(
        text_value=outline.side.meaning,
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        anchor_point=(column, top + 0.15 * height),
        anchor_point_visible=False,
    )


def build_presentation_state(
    findings: Findings,
    series: LoadedSeries,
    settings: OutputSettings,
    drawn: dict[str, list[tuple[int, Outline]]],
    when: datetime.datetime | None = None,
) -> hd.pr.GrayscaleSoftcopyPresentationState | None:
    """The outlines of a radiograph's masks on its first frame (`drawn`, as the SR draws
    them); None for a CT (it has a SEG)."""
    if series.modality == "CT" or len(series.datasets) != 1:
        return None
    when = when or datetime.datetime.now()
    image = series.datasets[0]
    layers, annotations = [], []
    for order, (mask, colour) in enumerate(
        zip(findings.masks, segment_colours(findings.masks), strict=True), start=1
    ):
        found = [outline for _, outline in drawn[mask.key]]
        if not found:
            continue
        layer = hd.pr.GraphicLayer(
            layer_name=LAYER_NAMES.get(mask.key, mask.key.upper()[:16]),
            order=order,
            description=mask.label[:64],
            display_color=hd.color.CIELabColor.from_rgb(*colour),
        )
        layers.append(layer)
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[image],
                graphic_layer=layer,
                graphic_objects=[
                    hd.pr.GraphicObject(
                        graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                        graphic_data=outline.points,
                        units=hd.pr.AnnotationUnitsValues.PIXEL,
                    )
                    for outline in found
                ],
                text_objects=[_side_label(outline) for outline in found if outline.side]
                or None,
            )
        )
    if not annotations:  # nothing outlined: the SR and the SC carry the result
        return None
    caption = result_line(findings)
    if caption:
        layer = hd.pr.GraphicLayer(
            layer_name=CAPTION_LAYER,
            order=len(layers) + 1,
            description="AI result (research use only)",
            display_color=hd.color.CIELabColor.from_rgb(255, 255, 0),
        )
        layers.append(layer)
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[image],
                graphic_layer=layer,
                text_objects=[
                    hd.pr.TextObject(
                        text_value=f"{caption} - research use only"[:1024],
                        units=hd.pr.AnnotationUnitsValues.DISPLAY,
                        bounding_box=(0.01, 0.01, 0.99, 0.06),
                    )
                ],
            )
        )
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image],
        series_instance_uid=hd.UID(),
        series_number=settings.pr_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=settings.model_name,
        software_versions=settings.software_version,
        device_serial_number=settings.device_serial_number,
        content_label="AI_OUTLINES",
        content_description="Automatic outlines; research use only, not for diagnosis",
        graphic_layers=layers,
        graphic_annotations=annotations,
        series_description=settings.pr_series_description,
        **creation_times(when, content=False),
    )
    # An unpaired body part is what lets General Series go without Laterality (Type 2C).
    state.BodyPartExamined = "CHEST"
    return stamp(state, models_of(findings), settings, when)
