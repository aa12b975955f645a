"""A mark per source series in the results folder: when its last run was and which reports
it sent, kept beside the results rather than in the database.

The database links a re-run to the run before it (jobs.previous_run). A node that lost its
database (restored from an old backup, a fresh SQLite file on the same data dir) forgets that
link and would send a second result set that looks like a first one; the mark lets it still
say that the new result replaces an earlier one, and name that report as its predecessor.
One small JSON file per series, written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from covid_plugin.store.jobs import ReportRef

log = logging.getLogger(__name__)

MARKS_FOLDER = "series"  # beside results/<job id>/, which are all digits


@dataclass(frozen=True)
class RunMark:
    """The last run of one source series, as its mark recorded it."""

    run_at: datetime.datetime
    n_instances: int
    reports: list[ReportRef]


class RunMarks:
    """The marks under one results folder."""

    def __init__(self, results_dir: Path) -> None:
        self.folder = results_dir / MARKS_FOLDER

    def _path(self, series_uid: str) -> Path:
        return self.folder / f"{series_uid}.json"

    def last_run(self, series_uid: str) -> RunMark | None:
        """The series' last recorded run; None when there is none or it cannot be read (a
        mark is a hint: a damaged one must not fail the job)."""
        path = self._path(series_uid)
        try:
            data = json.loads(path.read_text())
            return RunMark(datetime.datetime.fromisoformat(data["run_at"]),
                           int(data["n_instances"]),
                           [ReportRef(*report) for report in data["reports"]])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("ignoring the run mark %s: %s", path, type(error).__name__)
            return None

    def record(self, series_uid: str, run_at: datetime.datetime, n_instances: int,
               reports: list[ReportRef]) -> None:
        """Replace the series' mark with this run."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(series_uid)
        temporary = path.with_suffix(".tmp")
        text = json.dumps({
            "run_at": run_at.isoformat(timespec="seconds"),
            "n_instances": n_instances,
            "reports": [[r.study_uid, r.series_uid, r.sop_class_uid, r.sop_instance_uid]
                        for r in reports],
        })
        with open(temporary, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
