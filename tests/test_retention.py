"""Retention: spool, rejected/, results and rows age out; nothing still needed does."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from covid_plugin.config import Settings
from covid_plugin.instance import read_header
from covid_plugin.observability import Metrics
from covid_plugin.outputs import write_all
from covid_plugin.store.associations import Associations
from covid_plugin.store.db import Database, SQLiteDatabase
from covid_plugin.store.jobs import JobQueue
from covid_plugin.store.retention import purge
from covid_plugin.store.spool import Spool
from covid_plugin.worker import Worker
from tests.conftest import CHEST_CR, REPO, rider_files
from tests.pipelines_for_tests import MeanIntensityPipeline

pytestmark = pytest.mark.data  # every test here reads the data set

DAY = 86400.0


class State:
    """A data dir with one finished CT job, one refused instance and one radiograph still
    being received, made by the real spool, queue and worker."""

    def __init__(self, tmp_path: Path, db: Database | None = None, **config) -> None:
        self.settings = Settings(data_dir=tmp_path / "var", quiet_period_s=0, **config)
        self.db = db or SQLiteDatabase(self.settings.db_path)
        self.spool = Spool(self.settings.spool_dir, self.db)
        self.jobs = JobQueue(self.db)
        self.ct_files = [self._store(p) for p in rider_files(20)]
        series_uid = pydicom.dcmread(self.ct_files[0], stop_before_pixels=True).SeriesInstanceUID
        associations = Associations(self.db, "listener")
        associations.delivering("assoc", series_uid)
        associations.ended("assoc", released=True)
        self.worker = Worker(self.settings, self.spool, self.jobs, Metrics(),
                             [MeanIntensityPipeline()], write_all, set)
        self.worker.close_complete_series()
        assert self.worker.run_one() and self.jobs.get(1).state == "done"
        self.results = self.settings.results_dir / "1"
        self.refused = self.spool.reject(b"not dicom", "not a DICOM instance", "PACS", None)
        self.open_cr = self._store(CHEST_CR)  # its association is still open

    def _store(self, path: Path) -> Path:
        data = path.read_bytes()
        return self.spool.store(read_header(data), data, "PACS").path

    def count(self, sql: str) -> int:
        return self.db.connection().execute(sql).fetchone()[0]


def test_dry_run_reports_and_removes_nothing(tmp_path: Path, db: Database):
    state = State(tmp_path, db)
    report = purge(state.settings, state.db, dry_run=True, at=time.time() + 8 * DAY)
    assert report.files == {"spool": 20, "rejected": 1, "results": 2}
    assert report.summary().startswith("would remove 20 spool file(s)")
    assert all(p.exists() for p in state.ct_files) and state.refused.exists()
    assert state.results.is_dir() and state.count("SELECT COUNT(*) FROM instances") == 21
    assert state.count("SELECT COUNT(*) FROM rejected_instances") == 1


def test_expired_files_then_rows_go_and_open_series_stay(tmp_path: Path, db: Database):
    state = State(tmp_path, db)
    report = purge(state.settings, state.db, at=time.time() + 8 * DAY)
    assert report.files == {"spool": 20, "rejected": 1, "results": 2}
    assert not any(p.exists() for p in state.ct_files)
    assert not state.refused.exists() and not state.results.exists()
    assert state.count("SELECT COUNT(*) FROM rejected_instances") == 0
    assert state.open_cr.exists()  # a series still being received is never a candidate
    assert state.count("SELECT COUNT(*) FROM instances") == 1
    assert state.count("SELECT COUNT(*) FROM jobs") == 2  # rows are kept longer (db_days)
    rows = purge(state.settings, state.db, at=time.time() + 91 * DAY).rows
    assert rows["jobs"] == 1 and rows["series"] == 1
    assert [j.state for j in state.jobs.all()] == ["received"]


def test_results_waiting_to_be_sent_are_kept(tmp_path: Path):
    state = State(tmp_path, destinations=[{"ae_title": "PACS", "host": "127.0.0.1",
                                           "port": 9}])
    assert state.count("SELECT COUNT(*) FROM outbox WHERE state = 'pending'") == 2
    purge(state.settings, state.db, at=time.time() + 400 * DAY)
    assert len(list(state.results.glob("*/*"))) == 2  # results/<job>/<attempt>/
    assert state.count("SELECT COUNT(*) FROM jobs") == 2


def test_size_cap_removes_oldest_first_and_the_node_applies_it(tmp_path: Path):
    state = State(tmp_path, retention={"max_total_gb": 1e-9, "spool_days": None,
                                       "rejected_days": None, "results_days": None})
    state.worker.purge_if_due()  # the running node's periodic pass, due at once
    assert not any(p.exists() for p in state.ct_files) and not state.results.exists()
    assert not state.refused.exists() and state.open_cr.exists()


def test_nothing_expires_when_retention_is_off(tmp_path: Path):
    state = State(tmp_path, retention={"spool_days": None, "rejected_days": None,
                                       "results_days": None, "db_days": None})
    report = purge(state.settings, state.db, at=time.time() + 1000 * DAY)
    assert report.total_files == 0 and report.total_rows == 0


def test_purge_command_dry_run(tmp_path: Path):
    state = State(tmp_path, retention={"spool_days": 0, "rejected_days": 0, "results_days": 0})
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{state.settings.data_dir}"\n'
                      "[retention]\nspool_days = 0\nrejected_days = 0\nresults_days = 0\n")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "covid_plugin.cli", "--config", str(config),
                               "purge", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60)

    dry = cli("--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("would remove 20 spool file(s)")
    assert all(p.exists() for p in state.ct_files)
    done = cli()
    assert done.returncode == 0 and done.stdout.startswith("removed 20 spool file(s)")
    assert not any(p.exists() for p in state.ct_files)
