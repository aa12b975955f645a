"""End-to-end latency: from the last C-STORE of a study to the results acknowledged by a PACS.

One chest X-ray (dicom_samples) and one 300-slice CT, each sent several times to a fresh
`covid-plugin listen` (real pipelines, quiet period 0: a series is complete when its
association ends), results going to DCMTK storescp. The clock stops when the node's outbox
has every result marked sent, i.e. storescp acknowledged the last C-STORE. Also the node's peak
RSS (VmHWM) while it handles a 600-slice CT. The CTs are real RIDER chest slices (512x512)
repeated with new UIDs and positions continuing along z, since no 300-slice series is
redistributable here.

    python benchmarks/latency.py [--runs 3] [--device cpu]
    python benchmarks/latency.py --ct600-only   # only the 600-slice peak RSS (a few minutes)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covid_plugin.store.jobs import ENDED_STATES, JobState  # noqa: E402
from tests.conftest import NodeProcess, StoreSCP, rider_files, wait_for  # noqa: E402

CXR = REPO / "dicom_samples" / "cxr-covid_hannover-PA"


def make_ct(n_slices: int) -> list[pydicom.Dataset]:
    sources = [pydicom.dcmread(p) for p in rider_files()]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    z = [float(ds.ImagePositionPatient[2]) for ds in sources]
    step = abs(z[1] - z[0])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    z0 = float(sources[0].ImagePositionPatient[2])
    out = []
    for i in range(n_slices):
        ds = copy.deepcopy(sources[i % len(sources)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, z0 + i * step]
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def renew(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """A copy of the images as a new study/series, so each run is a fresh job."""
    study, series = generate_uid(), generate_uid()
    datasets = copy.deepcopy(datasets)
    for ds in datasets:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return datasets


def send(port: int, datasets: list[pydicom.Dataset]) -> float:
    """One association; returns the time the last C-STORE response arrived."""
    ae = AE(ae_title="BENCH_PACS")
    ae.dimse_timeout = ae.network_timeout = 300  # a loaded machine must not fail the benchmark
    for cx in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(*cx)
    assoc = ae.associate("127.0.0.1", port, ae_title="COVID_PLUGIN")
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    last = time.perf_counter()
    assoc.release()
    return last


def all_sent(db: Path, n_jobs: int) -> bool:
    conn = sqlite3.connect(db)
    try:
        jobs = conn.execute("SELECT state FROM jobs").fetchall()
        outbox = conn.execute("SELECT state FROM outbox").fetchall()
    finally:
        conn.close()
    done = [s for (s,) in jobs if s in ENDED_STATES]
    if any(s in (JobState.FAILED, JobState.QUARANTINED) for (s,) in jobs):
        raise RuntimeError("a job failed")
    return len(done) == n_jobs and outbox and all(s == "sent" for (s,) in outbox)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(work: Path, studies: Iterable[list[pydicom.Dataset]],
            device: str) -> tuple[list[float], float]:
    (work / "node_home").mkdir(parents=True)
    pacs = StoreSCP(work / "pacs").start()
    node = NodeProcess(work / "node_home", {
        "quiet_period_s": 0, "device": device, "log_level": "WARNING",
        "destinations": [{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        "outbox": {"poll_interval_s": 0.05},
    })
    node.start()
    db = Path(node.config["data_dir"]) / "covid_plugin.sqlite"
    times = []
    try:
        for n, datasets in enumerate(studies, start=1):
            last_store = send(node.port, datasets)
            wait_for(lambda n=n: all_sent(db, n), timeout=600, interval=0.02, what="results")
            times.append(time.perf_counter() - last_store)
        rss = peak_rss_mb(node.proc.pid)
    finally:
        node.stop()
        pacs.stop()
    return times, rss


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/latency.json (ct600_memory.json with "
                             "--ct600-only)")
    parser.add_argument("--ct600-only", action="store_true",
                        help="only the node's peak RSS while it handles a 600-slice CT")
    args = parser.parse_args()
    results = REPO / "benchmarks" / "results"
    if args.ct600_only:
        with tempfile.TemporaryDirectory() as tmp:
            _, rss = measure(Path(tmp) / "ct600", [make_ct(600)], args.device)
        report = {"device": args.device, "date": time.strftime("%Y-%m-%d"),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "ct600_peak_rss_mb": round(rss, 1)}
        out = args.out or results / "ct600_memory.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 0
    args.out = args.out or results / "latency.json"
    cxr = [pydicom.dcmread(p) for p in sorted(CXR.glob("*.dcm"))]
    ct300 = make_ct(300)
    report: dict = {"device": args.device, "runs": args.runs,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "date": time.strftime("%Y-%m-%d"),
                    "clock": "last C-STORE response -> outbox all sent (PACS acknowledged)"}
    with tempfile.TemporaryDirectory() as tmp:
        # the first study of each kind also pays for loading the models: reported apart
        times, _ = measure(Path(tmp) / "cxr", (renew(cxr) for _ in range(args.runs + 1)),
                           args.device)
        report["cxr_first_s"] = round(times[0], 3)
        report["cxr_s"] = [round(t, 3) for t in times[1:]]
        report["cxr_median_s"] = round(statistics.median(times[1:]), 3)
        times, _ = measure(Path(tmp) / "ct", (renew(ct300) for _ in range(args.runs + 1)),
                           args.device)
        report["ct300_first_s"] = round(times[0], 3)
        report["ct300_s"] = [round(t, 3) for t in times[1:]]
        report["ct300_median_s"] = round(statistics.median(times[1:]), 3)
        del ct300
        _, rss = measure(Path(tmp) / "ct600", [make_ct(600)], args.device)
        report["ct600_peak_rss_mb"] = round(rss, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
