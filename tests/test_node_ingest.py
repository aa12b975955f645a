"""Receiving: real senders (DCMTK storescu, pynetdicom) against `covid-plugin listen`."""

from __future__ import annotations

import sqlite3
import subprocess
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from tests.conftest import CHEST_CR, DATA, echo, rider_files, wait_for


def index(node) -> sqlite3.Connection:
    conn = sqlite3.connect(Path(node.config["data_dir"]) / "covid_plugin.sqlite")
    conn.row_factory = sqlite3.Row
    return conn


def storescu(port: int, files: list[Path], *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "COVID_PLUGIN", *options, "127.0.0.1", str(port),
         *map(str, files)], capture_output=True, text=True, timeout=120,
    )


def send(port: int, datasets: list[pydicom.Dataset], calling: str = "PYSCU") -> list[int | None]:
    """pynetdicom as sender; returns each C-STORE status (None: no answer)."""
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="COVID_PLUGIN")
    assert assoc.is_established
    statuses = [getattr(assoc.send_c_store(ds), "Status", None) for ds in datasets]
    assoc.release()
    return statuses


@pytest.mark.data
def test_storescu_series_is_spooled_indexed_and_deduplicated(node_factory):
    node = node_factory({"quiet_period_s": 3600}).start()
    files = rider_files(25)
    assert storescu(node.port, files).returncode == 0
    assert storescu(node.port, files[:5]).returncode == 0  # the same instances again
    db = index(node)
    rows = db.execute("SELECT sop_instance_uid, path FROM instances").fetchall()
    assert len(rows) == 25
    for row in rows:  # the bytes on disk are a complete, parseable instance
        assert pydicom.dcmread(row["path"]).SOPInstanceUID == row["sop_instance_uid"]
    series = db.execute("SELECT n_instances, modality FROM series").fetchall()
    assert [(s["n_instances"], s["modality"]) for s in series] == [(25, "CT")]
    assert db.execute("SELECT state FROM jobs").fetchall()[0]["state"] == "received"


@pytest.mark.data
def test_compressed_transfer_syntaxes_are_accepted_as_received(node_factory):
    node = node_factory({"quiet_period_s": 3600}).start()
    folder = DATA / "dicom" / "cornerstone_ctimage_chest-ct-transfer-syntaxes"
    files = sorted(folder.glob("*.dcm")) + [CHEST_CR]
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:  # the eight files are one image: give each its own identity
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    # pynetdicom proposes each file's own transfer syntax (DCMTK refuses one of these files)
    assert send(node.port, datasets) == [0] * len(files)
    got = {r[0] for r in index(node).execute("SELECT transfer_syntax FROM instances")}
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for f in files}
    assert got == sent and len(got) >= 8


def test_unknown_calling_ae_is_rejected(node_factory):
    node = node_factory({"allowed_callers": ["TESTSCU", "PACS1"]}).start()
    assert echo(node.port, calling="PACS1")
    assert not echo(node.port, calling="INTRUDER")
    result = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "COVID_PLUGIN",
                             "127.0.0.1", str(node.port)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "rejected" in node.log().lower()


@pytest.mark.data
@pytest.mark.parametrize("policy", ["refuse", "discard"])
def test_unprocessed_sop_class_is_refused_or_discarded(node_factory, policy):
    node = node_factory({"unsupported_sop_classes": policy}).start()
    ds = pydicom.dcmread(rider_files(1)[0])
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="COVID_PLUGIN")
    assert assoc.is_established
    if policy == "refuse":
        with pytest.raises(ValueError):  # no accepted context for MR
            assoc.send_c_store(ds)
        expected_log = "SOP class not processed"
    else:
        assert assoc.send_c_store(ds).Status == 0x0000
        expected_log = "discarded"
    assoc.release()
    assert index(node).execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    wait_for(lambda: expected_log in node.log(), timeout=5, what="log line")


def _without(ds: pydicom.Dataset, keyword: str) -> pydicom.Dataset:
    del ds[keyword]
    return ds


@pytest.mark.data
def test_malformed_instances_get_failure_status_and_node_stays_up(node_factory):
    node = node_factory().start()
    good = pydicom.dcmread(rider_files(1)[0])
    no_series = _without(pydicom.dcmread(rider_files(2)[1]), "SeriesInstanceUID")
    truncated = pydicom.dcmread(rider_files(3)[2])
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 2]
    no_pixels = _without(pydicom.dcmread(rider_files(4)[3]), "PixelData")
    statuses = send(node.port, [no_series, truncated, no_pixels, good])
    assert statuses[0] == 0xA900
    assert statuses[1] == 0xC000 and statuses[2] == 0xC000
    assert statuses[3] == 0x0000
    assert echo(node.port)
    reasons = [r[0] for r in index(node).execute("SELECT reason FROM rejected_instances")]
    assert reasons == ["missing required attribute SeriesInstanceUID",
                       "Pixel Data holds 262144 bytes, the image needs 524288",
                       "missing Pixel Data"]
    assert "refused instance" in node.log()


@pytest.mark.data
def test_unparseable_bytes_are_refused(node_factory):
    """A dataset whose encoding is broken (an element length past the end) cannot be stored."""
    node = node_factory().start()
    ds = pydicom.dcmread(rider_files(1)[0])
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    broken = pydicom.dcmread(BytesIO(raw[: len(raw) - 100_000]), defer_size=1024)
    # pynetdicom encodes from the deferred element's declared length: the peer sends a
    # dataset whose Pixel Data promises more bytes than follow
    assert send(node.port, [broken])[0] in (0xC000, None)
    assert echo(node.port)


@pytest.mark.data
def test_write_error_returns_out_of_resources(node_factory):
    import resource
    import signal

    def small_files() -> None:  # the node process cannot write a file over 64 KiB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    node = node_factory().start(preexec_fn=small_files)
    statuses = send(node.port, [pydicom.dcmread(f) for f in rider_files(2)])
    assert statuses == [0xA700, 0xA700]
    assert echo(node.port)
    assert index(node).execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    assert "could not store" in node.log()


@pytest.mark.data
def test_rows_zero_and_odd_bits_allocated_are_refused_at_receive(node_factory):
    node = node_factory().start()
    no_rows = pydicom.dcmread(rider_files(1)[0])
    no_rows.Rows = 0
    odd_bits = pydicom.dcmread(rider_files(2)[1])
    odd_bits.BitsAllocated = 7
    assert send(node.port, [no_rows, odd_bits]) == [0xA900, 0xC000]
    reasons = [r[0] for r in index(node).execute("SELECT reason FROM rejected_instances")]
    assert reasons == ["Rows must be 1 or more", "BitsAllocated must be 1 or a multiple of 8"]
    assert index(node).execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0


@pytest.mark.data
def test_recovery_keeps_the_sender_as_the_return_address(node_factory):
    """A file spooled but not indexed (a crash between rename and commit) is re-indexed at
    start under the AE title that sent it, read from its file meta (0002,0016)."""
    node = node_factory({"quiet_period_s": 3600}).start()
    assert storescu(node.port, rider_files(3)).returncode == 0
    node.kill9()
    db = index(node)
    paths = [Path(r["path"]) for r in db.execute("SELECT path FROM instances")]
    assert {str(pydicom.dcmread(p).file_meta.SourceApplicationEntityTitle) for p in paths} \
        == {"STORESCU"}
    with db:  # the index forgets them, as if the node died before its commit
        db.execute("DELETE FROM jobs")
        db.execute("DELETE FROM series")
        db.execute("DELETE FROM instances")
    db.close()
    node.start()
    rows = index(node).execute("SELECT calling_ae FROM instances").fetchall()
    assert [r["calling_ae"] for r in rows] == ["STORESCU"] * 3
    series = index(node).execute("SELECT calling_ae FROM series").fetchall()
    assert [r["calling_ae"] for r in series] == ["STORESCU"]


@pytest.mark.data
def test_new_study_and_series_directories_are_fsynced(tmp_path, monkeypatch):
    """The file's directory entry is durable only if each created directory's parent is
    synced too: spool/<study> in spool/, spool/<study>/<series> in spool/<study>/."""
    import os

    from covid_plugin.instance import read_header
    from covid_plugin.store import spool as spool_module
    from covid_plugin.store.db import SQLiteDatabase
    from covid_plugin.store.spool import Spool

    spool = Spool(tmp_path / "spool", SQLiteDatabase(tmp_path / "db.sqlite"))
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", recording_fsync)
    data = rider_files(1)[0].read_bytes()
    header = read_header(data)
    stored = spool.store(header, data, "PACS1")
    series_dir = stored.path.parent
    assert {spool.root, series_dir.parent, series_dir} <= set(synced)


@pytest.mark.data
@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
@pytest.mark.parametrize("birth_date", ["00000000", "1950"])
def test_header_values_never_reach_job_reasons(node_factory, birth_date):
    """A non-standard PatientBirthDate once failed the job with the value in `jobs.reason`,
    which `covid-plugin jobs` prints. Whatever the outcome, the value is not in it."""
    node = node_factory({"selection": {"min_ct_slices": 2}}).start()
    datasets = [pydicom.dcmread(f) for f in rider_files(3)]
    for ds in datasets:
        ds.PatientBirthDate = birth_date
    assert send(node.port, datasets) == [0, 0, 0]
    wait_for(lambda: index(node).execute(
        "SELECT 1 FROM jobs WHERE state IN ('done', 'failed')").fetchone(), timeout=30,
        what="the job to end")
    listing = node.cli("jobs").stdout
    assert birth_date not in listing and "out of range" not in listing
    assert birth_date not in node.log()


@pytest.mark.data
def test_encoding_errors_are_recorded_without_the_library_message():
    from covid_plugin.outputs import OutputError
    from covid_plugin.pipelines.interface import analyse
    from tests.pipelines_for_tests import MeanIntensityPipeline

    def writer(findings, series):
        try:
            raise ValueError("Unable to convert '1950' to 'DA' object")
        except ValueError as error:
            raise OutputError(f"cannot encode results: {error}", "1.2.3") from error

    outcome = analyse(MeanIntensityPipeline(), None, rider_files(2), writer)
    assert outcome.problems == ["results cannot be encoded (ValueError); details at DEBUG"]
