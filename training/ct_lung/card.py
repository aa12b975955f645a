"""models/ct-lung/card.md, written from its metrics so numbers never drift."""

from __future__ import annotations

from pathlib import Path

from training.common.card_text import HU_SOURCES, INTENDED_USE, device_text


def write_lung_card(out: Path, metrics: dict) -> None:
    low, high = metrics["plausible_ml_per_mm"]
    rows = "\n".join(
        f"| {name} | {r['slices']} x {r['spacing_mm'][0]:.2f} mm | {r['right_ml']:.0f} | "
        f"{r['left_ml']:.0f} | {r['total_ml']:.0f} | {r['ml_per_mm']:.1f} | "
        f"{'yes' if r['two_lungs'] else 'NO'} | {'yes' if r['right_lung_on_image_left'] else 'NO'}"
        f" | {r['airway_labelled_lung_ml']:.2f} | {r['seconds']:.2f} |"
        for name, r in metrics["per_series"].items()
    )
    storage = "\n".join(
        f"| {name} | {variant} | {v['right_ml']:.0f} | {v['left_ml']:.0f} | "
        f"{'yes' if v['same_sides'] else 'NO'} |"
        for name, r in metrics["per_series"].items() for variant, v in r.get("storage", {}).items()
    )
    text = f"""# ct-lung: right and left lung from Hounsfield units (rule-based)

{INTENDED_USE}

No lung masks could be staged, so this is a classical segmentation, not a trained model
(`weights: null`). **Right and left are the patient's**: the volume is turned from its stored
orientation (ImageOrientationPatient and the slice normal) to LPS with SimpleITK
`DICOMOrient` (axes permuted and flipped, never resampled), segmented there, and the labels
are turned back into the source slice grid. Steps: body (HU > -500, largest component, table
cut off), air inside the body (HU < -320), **trachea and main bronchi removed** (3D components
of air-dense lumen, HU < -950, whose centre lies within 15% of the air's width from the
midline, widened by 3 mm over their walls), 3D connected components >= 20 mL, right/left split
(two components, or a watershed from eroded seeds when the lungs touch), per-slice closing
(6 mm) and hole filling so that vessels and consolidation enclosed by lung stay lung; a 2D hole
that continues into the mediastinum in the next slices (cardiac apex, its fat pad, the hilum),
or that only the closing created and is larger than 2 cm², is not lung. Runs on an in-plane
grid of about 256 px. Reconstruction-circle padding is handled (a lung cut by the circle is
kept). Labels: 1 right lung (SCT 3341006), 2 left lung (SCT 44029006); lung SCT 39607008.

## Checked on (all real HU series in the shared data; nothing fitted on them)
{HU_SOURCES}
## Results
No reference masks: plausibility only. The series are partial blocks (1-60 slices), so volumes
are per block (the six COVID-CT-MD series P001 ... normal002 are whole chests, 4 mm); mL per
mm of extent compares them (plausible range {low:.0f}-{high:.0f} mL/mm for an adult
mid/lower chest). "airway mL" is airway lumen labelled lung: 3D pieces (>= 0.5 mL) of
air-dense voxels (< -950 HU) within 30 mm of the midline between the lungs, i.e. trachea and
main bronchi (should be about 0). Seconds
were measured on a shared 2-core machine while other jobs ran.

| series | slices | right mL | left mL | total mL | mL/mm | two lungs | right on image left \
| airway mL | s |
|---|---|---|---|---|---|---|---|---|---|
{rows}

All plausible: {metrics['all_plausible']}; two lungs everywhere: {metrics['all_two_lungs']};
right lung on image left everywhere (all these series are stored supine, columns to the
patient's left): {metrics['all_right_on_image_left']}; most airway labelled lung:
{metrics['max_airway_labelled_lung_ml']:.2f} mL.

The same whole-chest series stored three other ways (pixel data flipped and
ImageOrientationPatient rewritten so every voxel keeps its patient position; the tests do the
same with real DICOM files): same right and left volumes within 1%:
{metrics['storage_variants_same_sides']}.

| series | stored as | right mL | left mL | same sides |
|---|---|---|---|---|
{storage}

![lungs](overlay_lungs.png)

## Device
{device_text()}.

## Limits
- Dense consolidation or effusion touching the chest wall over a long stretch is not enclosed
  by lung and can be left out (visible on a NY-SBU COVID slice); so can tumours at the hilum.
- Airway removal takes the lumen near the midline; segmental bronchi stay in the mask, and an
  emphysematous bulla next to the mediastinum could be taken for airway.
- Consolidation enclosed by lung in one slice but reaching the chest wall or mediastinum in
  the next, or in the first/last slice of a partial series, is left out of the lung.
- Oblique series are turned to the nearest LPS axes (no resampling).
- Not validated against reference masks (none available with a usable licence).
"""
    (out / "card.md").write_text(text)
