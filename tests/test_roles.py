"""The roles' settings and command line: what a site writes to split listening from work."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from covid_plugin.cli import _settings, build_parser, cmd_config, main
from covid_plugin.config import ConfigError, Settings, load_settings
from covid_plugin.instance import read_header
from covid_plugin.ml.device import resolve_device
from covid_plugin.observability import Metrics
from covid_plugin.outputs import write_all
from covid_plugin.store.jobs import JobQueue
from covid_plugin.store.lock import DataDirInUse, DataDirLock
from covid_plugin.store.spool import Spool
from covid_plugin.worker import Worker
from tests.conftest import rider_files
from tests.pipelines_for_tests import MeanIntensityPipeline


def test_work_without_a_shared_database_is_refused_with_the_reason(tmp_path: Path, capsys):
    assert main(["work", "--data-dir", str(tmp_path)]) == 2
    assert "needs database_url" in capsys.readouterr().err


def test_a_listener_without_jobs_needs_a_shared_database():
    with pytest.raises(ConfigError, match="listener_runs_jobs = false needs database_url"):
        load_settings(None, {"listener_runs_jobs": False}, environ={})
    args = build_parser().parse_args(["listen", "--no-jobs"])
    with pytest.raises(ConfigError, match="needs database_url"):
        _settings(args)


def test_database_url_must_be_postgresql():
    with pytest.raises(ConfigError, match="database_url: .*postgresql://"):
        load_settings(None, {"database_url": "mysql://db/covid"}, environ={})


def test_a_worker_is_pinned_to_one_gpu_from_the_command_line(tmp_path: Path):
    args = build_parser().parse_args(
        ["work", "--device", "cuda:1", "--data-dir", str(tmp_path)])
    assert _settings(args).device == "cuda:1"
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="device"):
        load_settings(None, {"device": "gpu1"}, environ={})


def test_the_worker_loads_its_models_on_the_pinned_device(tmp_path: Path):
    class Recording:
        name, modalities = "recording", ("CT",)
        devices: list[str] = []

        def load_models(self, models_dir: Path, device: str) -> None:
            self.devices.append(device)

    pipeline = Recording()
    settings = Settings(data_dir=tmp_path, device="cuda:1")
    Worker(settings, None, None, None, [pipeline], None, set).runner.load_models()
    assert pipeline.devices == ["cuda:1"]


def test_leases_must_outlast_two_heartbeats():
    with pytest.raises(ConfigError, match="job_lease_s must be at least twice heartbeat_s"):
        load_settings(None, {"cluster": {"heartbeat_s": 10, "job_lease_s": 15}}, environ={})


def test_processes_sharing_a_database_share_the_data_dir_and_keep_an_embedded_node_out(
        tmp_path: Path):
    first = DataDirLock(tmp_path, shared=True).acquire()
    second = DataDirLock(tmp_path, shared=True).acquire()  # a listener and a worker
    with pytest.raises(DataDirInUse, match="embedded"):
        DataDirLock(tmp_path).acquire()
    first.release()
    second.release()
    alone = DataDirLock(tmp_path).acquire()
    with pytest.raises(DataDirInUse):
        DataDirLock(tmp_path, shared=True).acquire()
    alone.release()


def test_a_shared_spool_keeps_another_listeners_transfer_in_progress(tmp_path: Path, db):
    spool = Spool(tmp_path / "spool", db)
    fresh = spool.root / "tmp" / "other-listener.part"
    stale = spool.root / "tmp" / "crashed-long-ago.part"
    fresh.write_bytes(b"half an instance")
    stale.write_bytes(b"half an instance")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    spool.recover(keep_parts_younger_than_s=3600)
    assert fresh.exists() and not stale.exists()
    spool.recover()  # alone on the spool (embedded node): every temp file is a leftover
    assert not fresh.exists()


def test_only_one_of_several_workers_closes_a_series(db):
    with db.transaction() as conn:
        conn.execute("INSERT INTO series (series_uid, study_uid, modality, sop_class_uid, "
                     "body_part, description, image_type, calling_ae, n_instances, first_at, "
                     "last_at) VALUES ('1.1', '1', 'CT', '', '', '', '', 'A', 30, 0, 0)")
        conn.execute("INSERT INTO jobs (series_uid, state, created_at, updated_at) "
                     "VALUES ('1.1', 'received', 0, 0)")
    first, second = JobQueue(db), JobQueue(db)
    assert first.close(1, None) is True
    assert second.close(1, "selection rules") is False
    assert [(j.state, j.reason) for j in first.all()] == [("queued", None)]


@pytest.mark.data
def test_a_worker_that_lost_its_lease_drops_its_results(tmp_path: Path, db):
    """A worker stalls past its lease; another takes the job: the first one's results are
    neither recorded nor sent, and its files go."""
    settings = Settings(data_dir=tmp_path, quiet_period_s=0, selection={"min_ct_slices": 2},
                        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 9}])
    spool = Spool(settings.spool_dir, db)
    for path in rider_files(3):
        data = path.read_bytes()
        spool.store(read_header(data), data, "PACS")
    with db.transaction() as conn:
        conn.execute("UPDATE series SET released_at = last_at + 1")

    class Stalls(MeanIntensityPipeline):
        def run(self, series, models):
            time.sleep(0.1)  # past the 0.05 s lease
            other = JobQueue(db)
            other.expire_leases()
            assert other.claim("other-worker").id == 1
            return super().run(series, models)

    jobs = JobQueue(db, lease_s=0.05)
    told: list = []  # the demo's callback hears only of results that stand
    worker = Worker(settings, spool, jobs, Metrics(), [Stalls()], write_all, set,
                    lambda *result: told.append(result), owner="stalled-worker")
    assert worker.close_complete_series() == 1
    assert worker.run_one()
    [job] = jobs.all()
    assert (job.state, job.lease_owner, job.attempts) == ("running", "other-worker", 2)
    assert db.connection().execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    assert not (settings.results_dir / "1" / "1").exists()
    assert told == []


def test_an_association_end_the_database_refused_is_written_by_the_heartbeat(
        tmp_path: Path, monkeypatch):
    """Until its end is written the series counts as being delivered: the end must not be
    lost when the store refuses it for a moment, or the series would never complete."""
    from types import SimpleNamespace

    from covid_plugin.node.scp import StorageSCP
    from covid_plugin.store.associations import Associations
    from covid_plugin.store.db import SQLiteDatabase

    settings = Settings(data_dir=tmp_path)
    db = SQLiteDatabase(settings.db_path)
    associations = Associations(db, "listener")
    associations.heartbeat()
    scp = StorageSCP(settings, Spool(settings.spool_dir, db), Metrics(), associations)
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="PACS"))
    scp._delivering(assoc, "1.2.3")
    real_ended = Associations.ended

    def unwritable(self, name, released, series=()):
        raise sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(Associations, "ended", unwritable)
    scp._on_released(SimpleNamespace(assoc=assoc))
    assert associations.active_series() == {"1.2.3"}
    monkeypatch.setattr(Associations, "ended", real_ended)
    scp.record_ended()
    assert associations.active_series() == set()


def test_config_output_hides_the_database_password(capsys):
    settings = load_settings(None, {"database_url": "postgresql://covid:s3cret@db/covid"},
                             environ={})
    cmd_config(settings, build_parser().parse_args(["config"]))
    out = capsys.readouterr().out
    assert "s3cret" not in out and "postgresql://covid:***@db/covid" in out


@pytest.mark.data
def test_a_stalled_worker_leaves_the_winning_attempts_results_alone(tmp_path: Path, db):
    """The worker that took the job over finishes first; the stalled one then writes its own
    results and finds its lease lost: it removes its own attempt's folder, never the folder
    whose files the winner's outbox rows point to."""
    settings = Settings(data_dir=tmp_path, quiet_period_s=0, selection={"min_ct_slices": 2},
                        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 9}])
    spool = Spool(settings.spool_dir, db)
    for path in rider_files(3):
        data = path.read_bytes()
        spool.store(read_header(data), data, "PACS")
    with db.transaction() as conn:
        conn.execute("UPDATE series SET released_at = last_at + 1")
    winner = Worker(settings, spool, JobQueue(db), Metrics(), [MeanIntensityPipeline()],
                    write_all, set, owner="other-worker")

    class Stalls(MeanIntensityPipeline):
        def run(self, series, models):
            time.sleep(0.1)  # past the 0.05 s lease
            winner.jobs.expire_leases()
            assert winner.run_one()  # the other worker runs the job to the end meanwhile
            return super().run(series, models)

    jobs = JobQueue(db, lease_s=0.05)
    stalled = Worker(settings, spool, jobs, Metrics(), [Stalls()], write_all, set,
                     owner="stalled-worker")
    assert stalled.close_complete_series() == 1
    assert stalled.run_one()
    [job] = jobs.all()
    assert (job.state, job.attempts) == ("done", 2)
    paths = [Path(p) for (p,) in db.connection().execute("SELECT path FROM outbox")]
    assert paths and all(p.parent == settings.results_dir / "1" / "2" for p in paths)
    assert all(p.is_file() for p in paths)  # what the outbox will send is still there
    assert not (settings.results_dir / "1" / "1").exists()  # the stalled run's files went
