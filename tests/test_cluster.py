"""Several processes, one PostgreSQL database, one shared data dir: listeners and workers.

Every process here is a real `covid-plugin` child process; the database is a real Debian
PostgreSQL server (tests/postgres.py); senders are DCMTK storescu and pynetdicom, and the PACS
that receives the results is a pynetdicom storage SCP that counts every C-STORE, so that a
result sent twice would show.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from tests.conftest import NodeProcess, free_port, rider_files, wait_for
from tests.test_node_ingest import storescu

# every test here reads the data set, and starts real node processes around PostgreSQL
pytestmark = [pytest.mark.data, pytest.mark.slow]

TIMING = {"heartbeat_s": 0.5, "listener_stale_after_s": 2.0, "job_lease_s": 2.0,
          "outbox_lease_s": 5.0}


class CountingPacs:
    """A pynetdicom storage SCP that keeps every SOP Instance UID it is sent, repeats included."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self._lock = threading.Lock()
        self._server = None
        self.start()

    def start(self) -> None:
        """Listen (again, after `stop`: the PACS is back)."""
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@pytest.fixture
def pacs() -> Iterator[CountingPacs]:
    peer = CountingPacs()
    yield peer
    peer.stop()


class Cluster:
    """Listeners and workers sharing `database_url` and one data dir, each with its own log."""

    def __init__(self, root: Path, url: str, pacs: CountingPacs, **config) -> None:
        self.root, self.url = root, url
        self.config = {
            "database_url": url, "data_dir": str(root / "shared"),
            "pipelines": "tests.pipelines_for_tests:pipelines", "quiet_period_s": 1.0,
            "selection": {"min_ct_slices": 2}, "cluster": TIMING,
            "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        } | config
        self.processes: list[NodeProcess] = []

    def _process(self, name: str, command: tuple[str, ...],
                 env: dict[str, str] | None) -> NodeProcess:
        workdir = self.root / name
        workdir.mkdir()
        process = NodeProcess(workdir, self.config, env, command)
        self.processes.append(process)
        return process

    def listener(self, name: str) -> NodeProcess:
        return self._process(name, ("listen", "--no-jobs"), None).start()

    def worker(self, name: str, env: dict[str, str] | None = None) -> NodeProcess:
        process = self._process(name, ("work",), env)
        return process.start(ready=lambda: "pipeline models loaded" in process.log())

    def query(self, sql: str, *args) -> list[tuple]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql.replace("?", "%s"), args).fetchall()

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str, pacs: CountingPacs) -> Iterator:
    made: list[Cluster] = []

    def make(**config) -> Cluster:
        made.append(Cluster(tmp_path, postgres_url, pacs, **config))
        return made[-1]

    yield make
    for c in made:
        c.stop()


def small_series(folder: Path, count: int, slices: int = 3) -> list[list[Path]]:
    """`count` CT series of `slices` real RIDER slices each, under new UIDs."""
    sources = rider_files(slices)
    out = []
    for i in range(count):
        study, series = generate_uid(), generate_uid()
        paths = []
        for j, source in enumerate(sources):
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / f"s{i:02d}_{j}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        out.append(paths)
    return out


def test_two_listeners_three_workers_run_each_job_once_and_deliver_each_result_once(
        cluster, pacs, tmp_path: Path):
    c = cluster()
    listeners = [c.listener("listen-a"), c.listener("listen-b")]
    workers = [c.worker(f"work-{i}") for i in range(3)]
    folder = tmp_path / "studies"
    folder.mkdir()
    series = small_series(folder, 20)
    with ThreadPoolExecutor(max_workers=8) as senders:  # concurrent associations, both ports
        results = list(senders.map(lambda i: storescu(listeners[i % 2].port, series[i]),
                                   range(len(series))))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]

    def ended() -> list[tuple]:
        return c.query("SELECT state, attempts FROM jobs")
    wait_for(lambda: len(ended()) == 20 and all(s == "done" for s, _ in ended()), timeout=180,
             what="20 jobs done")
    assert sorted(a for _, a in ended()) == [1] * 20  # each run exactly once
    wait_for(lambda: all(s == "sent" for (s,) in c.query("SELECT state FROM outbox")),
             timeout=60, what="every result sent")
    expected = sorted(uid for (uid,) in c.query("SELECT sop_instance_uid FROM outbox"))
    assert len(expected) >= 20
    assert sorted(pacs.received) == expected  # every result, none twice
    done_by = [w.log().count(" done in ") for w in workers]
    assert sum(done_by) == 20
    assert sum(1 for n in done_by if n) >= 2, done_by  # the queue was shared
    assert c.query("SELECT COUNT(*) FROM instances") == [(60,)]


def test_a_worker_killed_mid_job_has_its_job_finished_by_another_after_the_lease(
        cluster, pacs, tmp_path: Path):
    c = cluster()
    listener = c.listener("listen")
    slow = {"TEST_PIPELINE_DELAY_S": "3"}
    workers = [c.worker("work-0", slow), c.worker("work-1", slow)]
    folder = tmp_path / "study"
    folder.mkdir()
    assert storescu(listener.port, small_series(folder, 1)[0]).returncode == 0
    wait_for(lambda: c.query("SELECT lease_owner FROM jobs WHERE state = 'running'"),
             timeout=30, what="a job running")
    [(owner,)] = c.query("SELECT lease_owner FROM jobs WHERE state = 'running'")
    victim = next(w for w in workers if f":{w.proc.pid}:" in owner)
    assert f"worker={owner}" in listener.cli("jobs").stdout  # the admin sees who runs it
    victim.kill9()
    survivor = next(w for w in workers if w is not victim)
    wait_for(lambda: c.query("SELECT state FROM jobs") == [("done",)], timeout=60,
             what="the job finished by the other worker")
    assert c.query("SELECT attempts FROM jobs") == [(2,)]
    assert " done in " in survivor.log() and "queued again: the lease of" in survivor.log()
    wait_for(lambda: all(s == "sent" for (s,) in c.query("SELECT state FROM outbox")),
             timeout=30, what="results sent")
    outbox = sorted(uid for (uid,) in c.query("SELECT sop_instance_uid FROM outbox"))
    assert outbox and sorted(pacs.received) == outbox  # the killed run sent nothing


def test_a_listener_killed_mid_association_loses_nothing_it_acknowledged(
        cluster, pacs, tmp_path: Path):
    c = cluster()
    doomed, other = c.listener("listen-a"), c.listener("listen-b")
    c.worker("work")
    folder = tmp_path / "study"
    folder.mkdir()
    [paths] = small_series(folder, 1, slices=10)
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", doomed.port, ae_title="COVID_PLUGIN")
    acknowledged = []
    for ds in datasets[:6]:
        assert assoc.send_c_store(ds).Status == 0
        acknowledged.append(str(ds.SOPInstanceUID))
    doomed.kill9()  # the association is still open
    stored = dict(c.query("SELECT sop_instance_uid, path FROM instances"))
    assert sorted(stored) == sorted(acknowledged)
    assert all(Path(path).is_file() for path in stored.values())
    # the dead listener's association ends as interrupted: the 6 slices are not processed
    wait_for(lambda: c.query("SELECT interrupted_at FROM series")[0][0] is not None,
             timeout=20, what="the association ended as interrupted")
    assert c.query("SELECT state FROM jobs") == [("received",)]
    # the sender sends the series again, to the other listener: processed once, complete
    assert storescu(other.port, paths).returncode == 0
    wait_for(lambda: c.query("SELECT state, n_instances_at_queue FROM jobs") == [("done", 10)],
             timeout=60, what="the resent series done")


def test_a_series_sent_over_two_listeners_waits_for_both_associations(cluster, tmp_path: Path):
    c = cluster()
    first, second = c.listener("listen-a"), c.listener("listen-b")
    c.worker("work")
    folder = tmp_path / "study"
    folder.mkdir()
    [paths] = small_series(folder, 1, slices=8)
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    still_open = ae.associate("127.0.0.1", second.port, ae_title="COVID_PLUGIN")
    for ds in datasets[4:]:
        assert still_open.send_c_store(ds).Status == 0
    assert storescu(first.port, paths[:4]).returncode == 0  # released normally
    # quiet for several quiet periods, and the listener holding it is alive: not complete
    wait_for(lambda: c.query("SELECT n_instances FROM series") == [(8,)], what="8 stored")
    time.sleep(4)
    assert c.query("SELECT state FROM jobs") == [("received",)]
    still_open.release()
    wait_for(lambda: c.query("SELECT state, n_instances_at_queue FROM jobs") == [("done", 8)],
             timeout=60, what="the series done once both associations ended")


def test_two_listeners_share_one_port(cluster, pacs, tmp_path: Path):
    """Two listeners behind one address on one machine (network.reuse_port): the kernel
    spreads the associations over both, and every series still runs once."""
    port = free_port()
    c = cluster(port=port, network={"reuse_port": True})
    listeners = []
    for name in ("listen-a", "listen-b"):
        process = c._process(name, ("listen", "--no-jobs"), None)
        listeners.append(process.start(ready=lambda p=process: "listening as" in p.log()))
    c.worker("work")
    folder = tmp_path / "studies"
    folder.mkdir()
    series = small_series(folder, 16, slices=2)
    with ThreadPoolExecutor(max_workers=8) as senders:
        results = list(senders.map(lambda paths: storescu(port, paths), series))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    wait_for(lambda: c.query("SELECT state, attempts FROM jobs") == [("done", 1)] * 16,
             timeout=120, what="16 jobs done once")
    accepted = [p.log().count("association from STORESCU") for p in listeners]
    assert sum(accepted) == 16 and all(accepted), accepted  # both took associations


def delivered_once(c: Cluster, pacs: CountingPacs) -> None:
    """Every result of every job is sent, and the PACS received each exactly once."""
    wait_for(lambda: all(s == "sent" for (s,) in c.query("SELECT state FROM outbox")),
             timeout=60, what="every result sent")
    expected = sorted(uid for (uid,) in c.query("SELECT sop_instance_uid FROM outbox"))
    assert expected and sorted(pacs.received) == expected


def test_a_listener_paused_past_stale_with_an_association_open_completes_its_series(
        cluster, pacs, tmp_path: Path):
    """The listener stops (SIGSTOP: swapping, a hung mount) for longer than
    listener_stale_after_s while a sender's association is open; a worker takes it for dead.
    It wakes, receives the rest, the sender releases: the series is processed once, whole."""
    c = cluster()
    listener = c.listener("listen")
    c.worker("work")
    folder = tmp_path / "study"
    folder.mkdir()
    [paths] = small_series(folder, 1, slices=6)
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="COVID_PLUGIN")
    assert all(assoc.send_c_store(ds).Status == 0 for ds in datasets[:3])
    os.kill(listener.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: c.query("SELECT interrupted_at FROM series")[0][0] is not None,
                 timeout=20, what="the paused listener taken for dead")
    finally:
        os.kill(listener.proc.pid, signal.SIGCONT)
    assert all(assoc.send_c_store(ds).Status == 0 for ds in datasets[3:])
    assoc.release()
    wait_for(lambda: c.query("SELECT state, n_instances_at_queue FROM jobs") == [("done", 6)],
             timeout=60, what="the series done, with all 6 instances")
    assert c.query("SELECT attempts FROM jobs") == [(1,)]
    delivered_once(c, pacs)


FAST_OUTBOX = {"backoff_base_s": 0.2, "backoff_max_s": 1.0, "poll_interval_s": 0.2}


def test_a_worker_paused_past_its_lease_while_the_pacs_is_down_drops_only_its_own_run(
        cluster, pacs, tmp_path: Path):
    """A worker stops (SIGSTOP) mid-job for longer than its lease while the PACS is down;
    the other worker runs the job again and its results wait for the PACS. The first one
    wakes, finds its lease lost and drops its own run, leaving the winner's files alone: once
    the PACS is back, each result arrives once."""
    pacs.stop()
    c = cluster(outbox=FAST_OUTBOX)
    listener = c.listener("listen")
    slow = {"TEST_PIPELINE_DELAY_S": "3"}
    workers = [c.worker("work-0", slow), c.worker("work-1", slow)]
    folder = tmp_path / "study"
    folder.mkdir()
    assert storescu(listener.port, small_series(folder, 1)[0]).returncode == 0
    wait_for(lambda: c.query("SELECT lease_owner FROM jobs WHERE state = 'running'"),
             timeout=30, what="a job running")
    [(owner,)] = c.query("SELECT lease_owner FROM jobs WHERE state = 'running'")
    stalled = next(w for w in workers if f":{w.proc.pid}:" in owner)
    os.kill(stalled.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: c.query("SELECT state, attempts FROM jobs") == [("done", 2)],
                 timeout=60, what="the job done by the other worker")
        wait_for(lambda: c.query("SELECT COUNT(*) FROM outbox WHERE attempts > 0")[0][0],
                 timeout=30, what="a failed delivery (the PACS is down)")
    finally:
        os.kill(stalled.proc.pid, signal.SIGCONT)
    wait_for(lambda: " dropped in " in stalled.log(), timeout=30, what="the stale run dropped")
    paths = [Path(p) for (p,) in c.query("SELECT path FROM outbox")]
    assert paths and all(p.is_file() for p in paths)  # the winner's results are still there
    pacs.start()
    delivered_once(c, pacs)
    assert c.query("SELECT state, attempts FROM jobs") == [("done", 2)]


def test_postgresql_restarted_during_receive_holds_the_series_until_resent(
        cluster, pacs, postgres_server, tmp_path: Path):
    """PostgreSQL stops in the middle of a transfer: the instance that came then is refused
    (0xA700), nothing refused is lost: the series waits, and health names it, until the
    sender resends the study; then it runs once, whole, and each result arrives once."""
    c = cluster()
    listener = c.listener("listen")
    c.worker("work")
    folder = tmp_path / "study"
    folder.mkdir()
    [paths] = small_series(folder, 1, slices=5)
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="COVID_PLUGIN")
    statuses = [assoc.send_c_store(ds).Status for ds in datasets[:2]]
    postgres_server.halt()
    try:
        statuses.append(assoc.send_c_store(datasets[2]).Status)
    finally:
        postgres_server.resume()
    statuses += [assoc.send_c_store(ds).Status for ds in datasets[3:]]
    assoc.release()
    assert statuses == [0, 0, 0xA700, 0, 0]
    wait_for(lambda: c.query("SELECT interrupted_at FROM series")[0][0] is not None,
             timeout=20, what="the series held for the resend")
    time.sleep(2)  # two quiet periods: it is not run without the refused instance
    assert c.query("SELECT state FROM jobs") == [("received",)]
    health = listener.cli("health")
    assert health.returncode == 1 and datasets[0].SeriesInstanceUID in health.stdout
    assert storescu(listener.port, paths).returncode == 0  # the PACS resends the study
    wait_for(lambda: c.query("SELECT state, n_instances_at_queue FROM jobs") == [("done", 5)],
             timeout=60, what="the series done once, whole")
    delivered_once(c, pacs)


def test_postgresql_restarted_during_a_job_ends_it_once(cluster, pacs, postgres_server,
                                                       tmp_path: Path):
    c = cluster(outbox=FAST_OUTBOX)
    listener = c.listener("listen")
    worker = c.worker("work", {"TEST_PIPELINE_DELAY_S": "3"})
    folder = tmp_path / "study"
    folder.mkdir()
    assert storescu(listener.port, small_series(folder, 1)[0]).returncode == 0
    wait_for(lambda: c.query("SELECT state FROM jobs") == [("running",)], timeout=30,
             what="the job running")
    postgres_server.halt()
    try:
        time.sleep(3)
    finally:
        postgres_server.resume()
    wait_for(lambda: c.query("SELECT state FROM jobs") == [("done",)], timeout=60,
             what="the job done")
    delivered_once(c, pacs)
    assert worker.log().count(" done in ") == 1
    # each loop tells of the outage when it starts and ends, not every 0.2 s round
    errors = [line for line in worker.log().splitlines() if " ERROR " in line]
    assert len(errors) <= 4, errors  # worker round, outbox round, two heartbeats
    assert listener.cli("health").returncode == 0
