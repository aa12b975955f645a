"""Clinical concepts the pipelines put into Findings (SNOMED CT, DICOM, UCUM).

The percent of a lung involved by lesions is an "Extent" (SCT 260858005) in percent, with the
lung as finding site and the lesion segment as its subject.
"""

from __future__ import annotations

from covid_plugin.findings import Code

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL = Code("49755003", "SCT", "Morphologically Abnormal Structure")
LUNG = Code("39607008", "SCT", "Lung")
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
LESION = Code("52988006", "SCT", "Lesion")
GROUND_GLASS = Code("112120", "DCM", "Ground glass opacity")
CONSOLIDATION = Code("95436008", "SCT", "Lung consolidation")

VOLUME = Code("118565006", "SCT", "Volume")
PERCENT_INVOLVED = Code("260858005", "SCT", "Extent")
MILLILITER = Code("mL", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "percent")
