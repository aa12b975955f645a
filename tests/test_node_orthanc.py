"""Orthanc as the PACS: it sends a study with its REST API and receives the results back."""

from __future__ import annotations

import pydicom
import pytest

from tests.conftest import rider_files, wait_for

pytestmark = pytest.mark.data  # every test here reads the data set


def test_orthanc_study_round_trip(node_factory, orthanc_factory):
    node = node_factory()
    orthanc = orthanc_factory(node.port)
    node.configure(return_addresses={orthanc.ae_title: {
        "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}})
    node.start()
    for path in rider_files(24):
        orthanc.upload(path)
    study = orthanc.get("/studies")[0]
    source_series = orthanc.get(f"/studies/{study}")["Series"]
    orthanc.post("/modalities/covid/store", {"Resources": [study], "Synchronous": True})

    def result_series() -> list[str]:
        return [s for s in orthanc.get(f"/studies/{study}")["Series"] if s not in source_series]

    new = wait_for(lambda: len(result_series()) == 2 and result_series(), timeout=90,
                   what="results filed under the source study")
    modalities = sorted(orthanc.get(f"/series/{s}")["MainDicomTags"]["Modality"] for s in new)
    assert modalities == ["OT", "SR"]
    source = pydicom.dcmread(rider_files(1)[0])
    tags = orthanc.get(f"/studies/{study}")["MainDicomTags"]
    assert tags["StudyInstanceUID"] == source.StudyInstanceUID
