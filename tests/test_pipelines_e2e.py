"""The shipped pipelines end to end: samples in, SR + SEG + SC out, valid and filed by Orthanc."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests

from tests.conftest import REPO, wait_for
from tests.dicom_validators import (
    dciodvfy_errors,
    dsrdump,
    requires_dciodvfy,
    requires_dsrdump,
)

SAMPLES = REPO / "dicom_samples"
CT_COVID = SAMPLES / "ct-covid_covid-ct-md-P002"
CXR_COVID = SAMPLES / "cxr-covid_hannover-PA"

SOP_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SOP_SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SOP_SC = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def run_output(tmp_path_factory) -> tuple[Path, str]:
    """`covid-plugin run` over every sample (one model load, shared by the tests below)."""
    out = tmp_path_factory.mktemp("run")
    result = subprocess.run(
        [sys.executable, "-m", "covid_plugin.cli", "run", str(SAMPLES), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


def _objects(folder: Path) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPClassUID): ds for ds in map(pydicom.dcmread, folder.glob("*.dcm"))}


@pytest.mark.slow  # run_output loads every model and runs every sample
def test_run_prints_a_row_per_series_with_findings(run_output):
    out, table = run_output
    assert table.count(" done ") == 5, table
    assert "involved" in table and "COVID" in table.upper()
    assert "Research use only" in table
    assert len(list(out.iterdir())) == 5


@pytest.mark.slow
@requires_dciodvfy
@requires_dsrdump
def test_ct_outputs_are_valid_and_reference_the_source(run_output):
    out, _ = run_output
    series_uid = pydicom.dcmread(next(CT_COVID.glob("*.dcm"))).SeriesInstanceUID
    objects = _objects(out / series_uid)
    assert set(objects) == {SOP_SR, SOP_SEG, SOP_SC}
    for path in (out / series_uid).glob("*.dcm"):
        assert dciodvfy_errors(path) == [], path.name
    segs = [pydicom.dcmread(p) for p in (out / series_uid).glob("*.dcm")]
    segs = sorted((ds for ds in segs if ds.SOPClassUID == SOP_SEG), key=lambda ds: ds.SeriesNumber)
    assert [s.SegmentLabel for seg in segs for s in seg.SegmentSequence][:2] == [
        "Right lung", "Left lung"]  # the lungs SEG, then the lesions SEG
    seg = segs[0]
    sources = {ds.SOPInstanceUID for ds in map(pydicom.dcmread, CT_COVID.glob("*.dcm"))}
    referenced = {
        ref.ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
        for ref in frame.DerivationImageSequence[0].SourceImageSequence
    }
    assert referenced and referenced <= sources
    sr_path = next(p for p in (out / series_uid).glob("*.dcm")
                   if pydicom.dcmread(p).SOPClassUID == SOP_SR)
    text = dsrdump(sr_path)
    for concept in ("Imaging Measurement Report", "Volume", "Extent",
                    "COVID-19", "Research use only"):
        assert concept in text, concept
    assert all(ds.StudyInstanceUID == seg.StudyInstanceUID for ds in objects.values())


@pytest.mark.slow
@requires_dciodvfy
def test_cxr_outputs_are_valid(run_output):
    out, _ = run_output
    series_uid = pydicom.dcmread(next(CXR_COVID.glob("*.dcm"))).SeriesInstanceUID
    paths = list((out / series_uid).glob("*.dcm"))
    assert {str(pydicom.dcmread(p).SOPClassUID) for p in paths} >= {SOP_SR, SOP_SC}
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name


def test_lateral_film_is_skipped_with_the_reason(tmp_path):
    """The ViewPosition rule needs no model: the pipeline skips before it touches one (it used
    to spawn a whole `covid-plugin run`, 39 s, to check this)."""
    from covid_plugin.outputs import write_all
    from covid_plugin.pipelines.cxr import CxrPipeline
    from covid_plugin.pipelines.interface import analyse

    ds = pydicom.dcmread(next(CXR_COVID.glob("*.dcm")))
    ds.ViewPosition = "LL"
    ds.save_as(tmp_path / "lateral.dcm")
    outcome = analyse(CxrPipeline(), {}, [tmp_path / "lateral.dcm"], write_all)
    assert outcome.results == [] and outcome.skipped == 1
    assert outcome.problems == [
        "skipped by the cxr pipeline: lateral view (ViewPosition LL); only frontal films"]


@requires_dciodvfy
def test_orthanc_sends_a_ct_study_and_files_sr_seg_sc(node_factory, orthanc_factory, tmp_path):
    node = node_factory({"pipelines": "covid_plugin.pipelines:default_pipelines"})
    orthanc = orthanc_factory(node.port)
    node.configure(return_addresses={orthanc.ae_title: {
        "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}})
    node.start()
    for path in sorted(CT_COVID.glob("*.dcm")):
        orthanc.upload(path)
    study = orthanc.get("/studies")[0]
    source_series = orthanc.get(f"/studies/{study}")["Series"]
    orthanc.post("/modalities/covid/store", {"Resources": [study], "Synchronous": True})

    def new_series() -> list[str]:
        return [s for s in orthanc.get(f"/studies/{study}")["Series"] if s not in source_series]

    found = wait_for(lambda: len(new_series()) == 4 and new_series(), timeout=300,
                     what="SR, two SEGs (lungs, lesions) and SC filed under the source study")
    modalities = sorted(orthanc.get(f"/series/{s}")["MainDicomTags"]["Modality"] for s in found)
    assert modalities == ["OT", "SEG", "SEG", "SR"]
    # what the PACS holds is what we validated: fetch each object back and check it
    for series in found:
        for instance in orthanc.get(f"/series/{series}")["Instances"]:
            path = tmp_path / f"{instance}.dcm"
            path.write_bytes(requests.get(f"{orthanc.url}/instances/{instance}/file",
                                          timeout=30).content)
            assert dciodvfy_errors(path) == [], path.name


def test_covid_is_called_at_the_shipped_threshold_not_by_argmax():
    from covid_plugin.ml.cxr import decide

    probs = {"normal": 0.6, "pneumonia_other": 0.1, "covid": 0.3}
    assert decide(probs, covid_threshold=0.25) == "covid"
    assert decide(probs, covid_threshold=0.35) == "normal"


def test_ct_without_lungs_is_skipped_with_the_reason(tmp_path):
    """An abdominal-only block (here: the sample shifted to soft tissue) has no lungs to grade."""
    import numpy as np

    from covid_plugin.pipelines.ct import CtPipeline
    from covid_plugin.pipelines.interface import SeriesSkipped
    from covid_plugin.volume import load_series_files

    series = load_series_files(sorted(CT_COVID.glob("*.dcm")))
    series.array = np.full_like(series.array, 40.0)  # soft tissue everywhere: no air, no lung
    pipeline = CtPipeline()
    with pytest.raises(SeriesSkipped, match="lungs not found"):
        pipeline.run(series, pipeline.load_models(REPO / "models", "cpu"))
