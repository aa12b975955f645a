"""Ingest speed: the same real CT instances, the same sender, every receiver, one run.

Receivers:
  dcmtk_storescp     DCMTK storescp writing to disk, no fsync (not durable): the wire's ceiling
  orthanc_durable    Debian's Orthanc with "SyncStorageArea": true: the durable peer the node is
                     measured against. Traced with strace (Orthanc 1.10.1): it writes each file
                     in place and calls fdatasync on it before the response; it does not fsync
                     the directory, so the file's name is not durable when it acknowledges
  pynetdicom_floor   a pynetdicom SCP whose handler answers success and keeps nothing: what
                     pynetdicom itself costs per instance
  pynetdicom_fsync   the same SCP writing each instance as the node's spool does (temporary
                     file, fsync, rename, directory fsync), with no parsing and no index: the
                     lower bound of a durable pynetdicom receiver
  covid_plugin_node  this node: file fsynced, renamed, directory fsynced and indexed before
                     every success response
  covid_plugin_2_listeners  two `covid-plugin listen --no-jobs` processes sharing one spool
                     and one PostgreSQL database (Debian's server, fsync on), the associations
                     spread over both; measured on the concurrent associations only

The sender is DCMTK storescu (TCP_NODELAY=1, for the DCMTK tools on both sides, Orthanc included)
for all of them, first on one association, then over several concurrent associations (several
modalities at once; storescp serves them one after another, it does not fork). Each repeat
runs every receiver once, in turn, so the ratios node/peer are taken within a repeat, under the
same load; the report gives the median of those per-repeat ratios. Results:
benchmarks/results/ingest.json.

    python benchmarks/ingest.py [--count 300] [--repeats 3] [--associations 4]
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
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import (  # noqa: E402
    NodeProcess,
    Orthanc,
    echo,
    free_port,
    rider_files,
    wait_for,
)
from tests.postgres import PostgresServer, postgres_bindir  # noqa: E402

# DCMTK reads TCP_NODELAY from the environment: storescu, storescp and Orthanc (built on DCMTK)
# all inherit it. Without it Orthanc's responses wait for the peer's delayed ACK (~40 ms each).
os.environ["TCP_NODELAY"] = "1"

NODE_AE = "COVID_PLUGIN"
Endpoint = tuple[str, int]

# pynetdicom alone: answers success after keeping nothing, or after writing the instance as
# the spool does (argv[2], a folder). The node's own work is what it adds to the second.
PYNETDICOM_FLOOR = """
import os, sys
from pathlib import Path
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def keep(event):
    if len(sys.argv) > 2:
        out = Path(sys.argv[2])
        name = str(event.request.AffectedSOPInstanceUID)
        tmp, final = out / "tmp" / (name + ".part"), out / (name + ".dcm")
        with open(tmp, "wb") as fh:
            fh.write(event.encoded_dataset())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_path(out)
    return 0

ae = AE("FLOOR")
ae.maximum_pdu_size = 4 * 1024 * 1024
ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
ae.add_supported_context("1.2.840.10008.1.1")
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, keep)])
"""


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


def send(endpoints: list[Endpoint], files: list[Path], called: str, associations: int) -> float:
    """The files split over `associations` storescu processes at once, spread round-robin over
    `endpoints`; returns the seconds from the first start to the last exit."""
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", f"BENCH{i}", "-aec", called,
                               endpoints[i % len(endpoints)][0],
                               str(endpoints[i % len(endpoints)][1]), *map(str, chunk)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i, chunk in enumerate(chunks)]
    errors = [p.communicate()[1].decode(errors="replace")[-300:] for p in procs]
    elapsed = time.perf_counter() - started
    failed = [e for p, e in zip(procs, errors, strict=True) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} storescu to {called} failed: {failed[0]}")
    return elapsed


@contextmanager
def dcmtk_storescp(work: Path, expected: int) -> Iterator[tuple[list[Endpoint], str]]:
    out, port = work / "dcmtk", free_port()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: echo(port, "STORESCP"), timeout=30, what="storescp")
        yield [("127.0.0.1", port)], "STORESCP"
        wait_for(lambda: len(list(out.iterdir())) >= expected, timeout=30, what="storescp files")
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def orthanc_durable(work: Path, expected: int) -> Iterator[tuple[list[Endpoint], str]]:
    folder = work / "orthanc"
    shutil.rmtree(folder, ignore_errors=True)
    peer = Orthanc(folder, node_port=104, extra={"SyncStorageArea": True}).start()
    try:
        yield [("127.0.0.1", peer.dicom_port)], peer.ae_title
        held = peer.get("/statistics")["CountInstances"]
        assert held == expected, f"Orthanc holds {held} of {expected}"
    finally:
        peer.stop()


@contextmanager
def _pynetdicom(out: Path | None, expected: int) -> Iterator[tuple[list[Endpoint], str]]:
    port = free_port()
    command = [sys.executable, "-c", PYNETDICOM_FLOOR, str(port)]
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
        (out / "tmp").mkdir(parents=True)
        command.append(str(out))
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: echo(port, "FLOOR"), timeout=30, what="pynetdicom floor")
        yield [("127.0.0.1", port)], "FLOOR"
    finally:
        proc.terminate()
        proc.wait(10)
    if out is not None:
        held = len(list(out.glob("*.dcm")))
        assert held == expected, f"pynetdicom_fsync holds {held} of {expected}"


def pynetdicom_floor(work: Path, expected: int):  # noqa: ANN201 (a context manager)
    return _pynetdicom(None, expected)


def pynetdicom_fsync(work: Path, expected: int):  # noqa: ANN201 (a context manager)
    return _pynetdicom(work / "pynetdicom", expected)


POSTGRES: list[PostgresServer] = []  # started once in main(), when installed


def start_nodes(folder: Path, listeners: int = 1) -> list[NodeProcess]:
    """`covid-plugin listen` processes, one port each: one all-in-one node on the embedded
    SQLite store, or `listeners` listener-only processes sharing one spool and a fresh
    PostgreSQL database."""
    config = {"quiet_period_s": 3600, "log_level": "WARNING",
              "pipelines": "tests.pipelines_for_tests:pipelines",
              "data_dir": str(folder / "var")}
    if listeners == 1:
        return [NodeProcess(folder, config).start()]
    config |= {"database_url": POSTGRES[0].create_database(), "listener_runs_jobs": False}
    nodes = []
    for i in range(listeners):
        (folder / f"listener{i}").mkdir()
        nodes.append(NodeProcess(folder / f"listener{i}", config).start())
    return nodes


@contextmanager
def covid_plugin_node(work: Path, expected: int,
                      listeners: int = 1) -> Iterator[tuple[list[Endpoint], str]]:
    folder = work / "node"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    nodes = start_nodes(folder, listeners)
    try:
        yield [("127.0.0.1", n.port) for n in nodes], NODE_AE
    finally:
        for node in nodes:
            node.stop()
    held = len(list((folder / "var" / "spool").glob("*/*/*.dcm")))
    assert held == expected, f"node holds {held} of {expected}"


RECEIVERS = {
    "dcmtk_storescp": dcmtk_storescp,
    "orthanc_durable": orthanc_durable,
    "pynetdicom_floor": pynetdicom_floor,
    "pynetdicom_fsync": pynetdicom_fsync,
    "covid_plugin_node": covid_plugin_node,
    "covid_plugin_2_listeners": partial(covid_plugin_node, listeners=2),
}
OURS = ("covid_plugin_node", "covid_plugin_2_listeners")


def measure(files: list[Path], work: Path, repeats: int,
            modes: list[int]) -> dict[int, dict[str, list[float]]]:
    """Seconds per receiver for each number of associations; receivers alternate in every
    repeat so that a change in the machine's load hits all of them alike."""
    seconds: dict[int, dict[str, list[float]]] = {m: {r: [] for r in RECEIVERS} for m in modes}
    for repeat in range(repeats):
        for associations in modes:
            for name, receiver in RECEIVERS.items():
                if name == "covid_plugin_2_listeners" and (associations == 1 or not POSTGRES):
                    seconds[associations].pop(name, None)  # one association: one listener
                    continue
                with receiver(work, len(files)) as (endpoints, called):
                    elapsed = send(endpoints, files, called, associations)
                seconds[associations][name].append(elapsed)
                print(f"repeat {repeat + 1}/{repeats}, {associations} association(s): "
                      f"{name:18s} {len(files) / elapsed:7.1f} files/s", flush=True)
    return seconds


def summarise(seconds: dict[str, list[float]], count: int) -> dict:
    """files/s (median) per receiver, and the node's ratio to each peer: the median of the
    ratios taken within each repeat."""
    ratios = {
        f"{ours.removeprefix('covid_plugin_')}_over_{peer}": round(statistics.median(
            t_peer / t_ours for t_peer, t_ours in zip(times, seconds[ours], strict=True)), 3)
        for ours in OURS if ours in seconds
        for peer, times in seconds.items() if peer not in OURS
    }
    return {
        "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "files_per_s_median": {k: round(count / statistics.median(v), 1)
                               for k, v in seconds.items()},
        "ratios_median_of_repeats": ratios,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", type=int, default=4,
                        help="concurrent associations of the second measurement")
    parser.add_argument("--out", type=Path,
                        default=REPO / "benchmarks" / "results" / "ingest.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    bindir = postgres_bindir()
    if bindir is None:
        print("PostgreSQL is not installed: the two-listener measurement is left out")
    else:
        POSTGRES.append(PostgresServer(bindir, durable=True).start())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "in").mkdir()
            files = make_instances(work / "in", args.count)
            mb = sum(p.stat().st_size for p in files) / 1e6
            seconds = measure(files, work, args.repeats, [1, args.associations])
    finally:
        for server in POSTGRES:
            server.stop()
    report = {
        "instances": args.count, "megabytes": round(mb, 1), "repeats": args.repeats,
        "sender": "DCMTK storescu, TCP_NODELAY=1 (sender, storescp and Orthanc)",
        "one_association": summarise(seconds[1], args.count),
        "concurrent": {"associations": args.associations,
                       **summarise(seconds[args.associations], args.count)},
        "durability": {
            "covid_plugin_node": "fsync file, rename, fsync directory, index commit, then "
                                 "acknowledge",
            "orthanc_durable": "SyncStorageArea: fdatasync of the file before the response, "
                               "no directory fsync (strace, Orthanc 1.10.1)",
            "dcmtk_storescp": "none (page cache only)",
            "pynetdicom_floor": "keeps nothing",
            "pynetdicom_fsync": "fsync file, rename, fsync directory (no parse, no index)",
            "covid_plugin_2_listeners": "as the node; index in PostgreSQL (fsync on, "
                                        "synchronous_commit off, as SQLite's NORMAL)",
        },
        "load_average_1min": {"before": round(load_before[0], 2),
                              "after": round(os.getloadavg()[0], 2)},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for label, part in (("1 association", report["one_association"]),
                        (f"{args.associations} associations", report["concurrent"])):
        print(f"--- {label}")
        for name, rate in part["files_per_s_median"].items():
            print(f"{name:20s} {rate:8.1f} files/s")
        for name, ratio in part["ratios_median_of_repeats"].items():
            print(f"{name:36s} {ratio:6.2f}")
    print(f"load average {report['load_average_1min']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
