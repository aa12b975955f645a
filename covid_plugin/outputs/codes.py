"""Coded concepts the writers add on their own (the findings bring the clinical ones).

Kept in one place so that the SR, the SEG and the tests agree on every code; values are from
SNOMED CT (SCT), DICOM (DCM) and UCUM as published in PS3.16.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from covid_plugin.findings import Code

CT_OF_CHEST = CodedConcept("169069000", "SCT", "Computed tomography of chest")
CHEST_RADIOGRAPH = CodedConcept("399208008", "SCT", "Plain X-ray of chest")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
COMMENT = codes.DCM.Comment
# TID 1500 row 12: the document-level container for qualitative evaluations and free text.
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
PERCENT = CodedConcept("%", "UCUM", "percent")
# The area of an outline on a film without a pixel size (UCUM annotation: a count of pixels)
PIXELS = CodedConcept("{pixels}", "UCUM", "pixels")
# Concepts no standard names: each class's probability and the decision threshold, so that a
# viewer that prints a measurement as "<concept name>: <value> <unit>" (OHIF) names the class.
# A private scheme (PS3.16 8.2: designators starting "99"), declared in the SR's Coding Scheme
# Identification Sequence.
LOCAL_SCHEME = "99COVIDPLUGIN"
LOCAL_SCHEME_NAME = "covid_plugin report concepts"
DEVICE = codes.DCM.Device
AI_FAMILY = codes.cid7162.ArtificialIntelligence
RULE_BASED_FAMILY = codes.cid7162.MorphologicalOperations
RULE_BASED_SHA256 = "rule-based"  # what ModelSpec.info() reports for a model without weights

# A radiograph's lung outlines by side (the same concepts the CT pipeline's lung masks carry).

# Anatomy segments (lungs) are drawn as contours, not as lesions, and do not pick the key slice.
ANATOMY_CATEGORIES = frozenset({"123037004", "91723000"})  # Anatomical Structure (old and new)

INTENDED_USE = (
    "Research use only; not for diagnosis. Results were produced automatically by a model that "
    "has not been cleared or approved for clinical use and must be reviewed by a qualified "
    "reader together with the images."
)


def coded(code: Code) -> CodedConcept:
    """A findings Code as the concept highdicom takes."""
    return CodedConcept(code.value, code.scheme, code.meaning)


def probability_of(code: Code) -> CodedConcept:
    """'COVID-19 probability': the probability the classifier gives a class."""
    return CodedConcept(f"P{code.value}"[:16], LOCAL_SCHEME, f"{code.meaning} probability"[:64])


def threshold_of(code: Code) -> CodedConcept:
    """'COVID-19 decision threshold': the class is called at or above this probability."""
    return CodedConcept(
        f"T{code.value}"[:16], LOCAL_SCHEME, f"{code.meaning} decision threshold"[:64]
    )


def procedure_reported(kind: str) -> CodedConcept:
    """The procedure TID 1500 reports on, from the pipeline kind ("ct" or "cxr")."""
    return CT_OF_CHEST if kind == "ct" else CHEST_RADIOGRAPH
