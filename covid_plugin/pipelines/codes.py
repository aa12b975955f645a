"""Clinical concepts the pipelines put into Findings (SNOMED CT, DICOM, UCUM).

pydicom's code dictionary (PS3.16) supplies the concepts it holds under the meaning written
here; the rest are written out because it lacks them (the lungs by side, consolidation,
millilitres) or holds them under another meaning than the one a viewer shows and the tests
expect ("Body structure (body structure)" for Anatomical Structure, "Extent (attribute)",
"Percent").

The percent of a lung involved by lesions is an "Extent" (SCT 260858005) in percent, with the
lung as finding site and the lesion segment as its subject.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes as dictionary
from pydicom.sr.coding import Code as DicomCode

from covid_plugin.findings import Code


def _listed(concept: DicomCode) -> Code:
    """A concept from pydicom's dictionary as the plain Code that Findings carry."""
    return Code(concept.value, concept.scheme_designator, concept.meaning)


ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL = _listed(dictionary.SCT.MorphologicallyAbnormalStructure)
LUNG = _listed(dictionary.SCT.Lung)
LESION = _listed(dictionary.SCT.Lesion)
GROUND_GLASS = _listed(dictionary.DCM.GroundGlassOpacity)
CONSOLIDATION = Code("95436008", "SCT", "Lung consolidation")

VOLUME = _listed(dictionary.SCT.Volume)
PERCENT_INVOLVED = Code("260858005", "SCT", "Extent")
MILLILITER = Code("mL", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "percent")
