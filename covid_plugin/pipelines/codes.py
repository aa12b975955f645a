"""Clinical concepts the pipelines put into Findings (SNOMED CT, DICOM, UCUM).

One standard concept was not found for "percent of a lung's volume involved by lesions", so it
uses a private coding scheme (99COVIDPLUGIN), as DICOM PS3.16 allows, and says so in its meaning.
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
PERCENT_INVOLVED = Code("CVP001", "99COVIDPLUGIN", "Percent of lung volume involved by lesions")
MILLILITER = Code("mL", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "percent")
