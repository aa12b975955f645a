"""Ingest speed: the same 300 CT-sized instances, one association, three receivers, one run.

(a) DCMTK storescp writing to disk, (b) pynetdicom's storescp, (c) this node (durable spool:
fsync + index commit before every acknowledgement). The sender is DCMTK storescu for all three,
with TCP_NODELAY=1 for the DCMTK tools. Prints files/s and the ratio node/storescp, then the
same files over several concurrent associations (storescp vs node), and writes
benchmarks/results/ingest.json.

    python benchmarks/ingest.py [--count 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import NodeProcess, echo, free_port, rider_files, wait_for  # noqa: E402

ENV = os.environ | {"TCP_NODELAY": "1"}


def make_instances(folder: Path, count: int) -> list[Path]:
    """`count` real 512x512 16-bit CT slices (RIDER, re-identified with new UIDs)."""
    sources = rider_files()
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = pydicom.dcmread(sources[i % len(sources)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = folder / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, files: list[Path], called: str) -> float:
    """storescu, one association; returns seconds from start to the last response."""
    started = time.perf_counter()
    result = subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
         *map(str, files)], env=ENV, capture_output=True, text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed: {result.stderr[-500:]}")
    return elapsed


def send_parallel(port: int, files: list[Path], called: str, associations: int) -> float:
    """The same files split over several storescu processes at once (several modalities)."""
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", f"BENCH{i}", "-aec", called, "127.0.0.1",
                               str(port), *map(str, chunk)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i, chunk in enumerate(chunks)]
    failed = [p for p in procs if p.wait() != 0]
    elapsed = time.perf_counter() - started
    if failed:
        raise RuntimeError(f"{len(failed)} storescu to {called} failed")
    return elapsed


def run_peer(command: list[str], port: int, called: str, files: list[Path], out: Path,
             repeats: int, associations: int = 1) -> list[float]:
    times = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: echo(port, called), timeout=30, what=called)
            times.append(send(port, files, called) if associations == 1
                         else send_parallel(port, files, called, associations))
            wait_for(lambda: len(list(out.rglob("*"))) >= len(files), timeout=30,
                     what="all files written")
        finally:
            proc.terminate()
            proc.wait(10)
    return times


def run_node(files: list[Path], work: Path, repeats: int, associations: int = 1) -> list[float]:
    times = []
    for i in range(repeats):
        folder = work / f"node{associations}_{i}"
        folder.mkdir(parents=True)
        node = NodeProcess(folder, {"quiet_period_s": 3600, "log_level": "WARNING",
                                    "pipelines": "tests.pipelines_for_tests:pipelines"})
        node.start()
        try:
            times.append(send(node.port, files, "COVID_PLUGIN") if associations == 1
                         else send_parallel(node.port, files, "COVID_PLUGIN", associations))
        finally:
            node.stop()
        held = list((folder / "var" / "spool").glob("*/*/*.dcm"))
        assert len(held) == len(files), f"node holds {len(held)} of {len(files)}"
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ingest.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        files = make_instances(work / "in", args.count)
        mb = sum(p.stat().st_size for p in files) / 1e6
        p1, p2 = free_port(), free_port()
        results = {
            "dcmtk_storescp": run_peer(
                ["storescp", "-aet", "STORESCP", "-od", str(work / "dcmtk"), str(p1)],
                p1, "STORESCP", files, work / "dcmtk", args.repeats),
            "pynetdicom_storescp": run_peer(
                [sys.executable, "-m", "pynetdicom", "storescp", "-aet", "PYSTORESCP",
                 "-od", str(work / "pynetdicom"), str(p2)],
                p2, "PYSTORESCP", files, work / "pynetdicom", args.repeats),
            "covid_plugin_node": run_node(files, work, args.repeats),
        }
        # several modalities at once: DCMTK storescp serves one association at a time
        parallel = {
            "dcmtk_storescp": run_peer(
                ["storescp", "-aet", "STORESCP", "-od", str(work / "dcmtk"), str(p1)],
                p1, "STORESCP", files, work / "dcmtk", args.repeats, args.associations),
            "covid_plugin_node": run_node(files, work, args.repeats, args.associations),
        }
    rates = {name: args.count / statistics.median(t) for name, t in results.items()}
    parallel_rates = {name: args.count / statistics.median(t) for name, t in parallel.items()}
    report = {
        "instances": args.count, "megabytes": round(mb, 1), "repeats": args.repeats,
        "sender": "DCMTK storescu, one association, TCP_NODELAY=1",
        "seconds": {k: [round(x, 3) for x in v] for k, v in results.items()},
        "files_per_s_median": {k: round(v, 1) for k, v in rates.items()},
        "ratio_node_over_dcmtk_storescp": round(
            rates["covid_plugin_node"] / rates["dcmtk_storescp"], 3),
        "concurrent": {
            "associations": args.associations,
            "seconds": {k: [round(x, 3) for x in v] for k, v in parallel.items()},
            "files_per_s_median": {k: round(v, 1) for k, v in parallel_rates.items()},
            "ratio_node_over_dcmtk_storescp": round(
                parallel_rates["covid_plugin_node"] / parallel_rates["dcmtk_storescp"], 3),
        },
        "node_durability": "fsync file + rename + fsync directory + WAL commit, per instance",
        "load_average_at_end": os.getloadavg()[0],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, rate in rates.items():
        print(f"{name:22s} {rate:8.1f} files/s")
    print(f"ratio node / DCMTK storescp: {report['ratio_node_over_dcmtk_storescp']:.2f}")
    for name, rate in parallel_rates.items():
        print(f"{name:22s} {rate:8.1f} files/s over {args.associations} associations")
    print(f"ratio over {args.associations} associations: "
          f"{report['concurrent']['ratio_node_over_dcmtk_storescp']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
