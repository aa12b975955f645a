"""One recommended display colour per segment, shared by the SEG, the GSPS, the SR and the SC.

Colours are chosen to stay apart when drawn over grey lungs and over each other: the two lungs
green and blue, ground glass yellow, consolidation magenta (red on orange blended to brown),
the radiograph's lungs green and the region behind a classification orange-red. Segments are
matched by their key first, then by their property type; anything else takes the next unused
colour of a fallback palette, so no two segments of one object share a colour.
"""

from __future__ import annotations

from covid_plugin.findings import Mask

RGB = tuple[int, int, int]

BY_KEY: dict[str, RGB] = {
    "lung_right": (0, 200, 0),
    "lung_left": (0, 140, 255),
    "ggo": (255, 220, 0),
    "consolidation": (255, 0, 220),
    "lungs": (0, 200, 0),
    "suspicious_region": (255, 90, 0),
}
BY_PROPERTY: dict[str, RGB] = {  # SNOMED CT / DCM code values of the property type
    "3341006": BY_KEY["lung_right"],  # Right lung
    "44029006": BY_KEY["lung_left"],  # Left lung
    "39607008": BY_KEY["lungs"],  # Lung
    "112120": BY_KEY["ggo"],  # Ground glass opacity (DCM)
    "45814001": BY_KEY["ggo"],  # Ground glass opacity (SCT)
    "95436008": BY_KEY["consolidation"],  # Lung consolidation
}
FALLBACK: tuple[RGB, ...] = ((0, 255, 255), (255, 128, 128), (160, 100, 255), (255, 255, 255))


def segment_colours(masks: list[Mask]) -> list[RGB]:
    """The colour of each mask, distinct within the list."""
    colours: list[RGB] = []
    spare = [c for c in FALLBACK]
    for mask in masks:
        colour = BY_KEY.get(mask.key) or BY_PROPERTY.get(mask.property_type.value)
        if colour is None or colour in colours:
            colour = next((c for c in spare if c not in colours), spare[-1])
        colours.append(colour)
    return colours
