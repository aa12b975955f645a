"""A node that lost its database still says that a re-run replaces the earlier result: the
data dir keeps a mark per source series (store/run_marks.py)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pydicom
import pytest

from covid_plugin.store.jobs import ReportRef
from covid_plugin.store.run_marks import RunMarks
from tests.conftest import REPO, wait_for
from tests.test_node_ingest import send

FILM = next((REPO / "dicom_samples" / "cxr-normal_nih-cxr14-PA").glob("*.dcm"))


def test_a_mark_reads_back_and_a_damaged_one_is_ignored(tmp_path: Path) -> None:
    marks = RunMarks(tmp_path)
    when = datetime.datetime(2026, 12, 6, 5, 31, 7)
    report = ReportRef("1.2", "1.2.3", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4")
    assert marks.last_run("9.9") is None
    marks.record("9.9", when, 20, [report])
    mark = marks.last_run("9.9")
    assert mark is not None and mark.run_at == when and mark.n_instances == 20
    assert mark.reports == [report]
    (tmp_path / "series" / "9.9.json").write_text("{not json")
    assert marks.last_run("9.9") is None


def reports(pacs) -> list[pydicom.Dataset]:
    return [ds for ds in map(pydicom.dcmread, pacs.files()) if ds.Modality == "SR"]


@pytest.mark.slow  # two pipeline runs through a node
def test_a_rerun_after_the_database_was_lost_replaces_the_earlier_report(
        node_factory, storescp_factory):
    pacs = storescp_factory().start()
    node = node_factory({"destinations": [
        {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}]}).start()
    assert send(node.port, [pydicom.dcmread(FILM)]) == [0]
    wait_for(lambda: len(reports(pacs)) == 1, timeout=120, what="first report")
    (first,) = reports(pacs)
    node.stop()
    for path in Path(node.config["data_dir"]).glob("covid_plugin.sqlite*"):
        path.unlink()  # the node's state is lost; its data dir is not
    node.start()
    assert send(node.port, [pydicom.dcmread(FILM)]) == [0]
    wait_for(lambda: len(reports(pacs)) == 2, timeout=120, what="second report")
    (second,) = [ds for ds in reports(pacs) if ds.SOPInstanceUID != first.SOPInstanceUID]
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    notes = [str(item.TextValue) for item in second.ContentSequence[-1].ContentSequence]
    assert any(note.startswith("Replaces the earlier AI result for this series (1 instances), "
                               "made ") for note in notes), notes
