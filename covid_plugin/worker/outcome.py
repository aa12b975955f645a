"""How a job ended, as a value: the runner decides it, the recorder writes it to the queue.

A value rather than a closure that writes itself: it can be logged, counted, and kept while
the store takes no writes (a full disk) to be written on a later round.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from covid_plugin.findings import Findings
from covid_plugin.store.jobs import ReportRef
from covid_plugin.store.outbox import Delivery


class Ending(StrEnum):
    """How a job ended, as the worker logs and counts it: the `outcome` label of
    covid_plugin_jobs_total, whose values dashboards read (keep the strings)."""

    DONE = "done"
    SKIPPED = "skipped"  # the pipeline declined the series (its "not analysed" report is sent)
    RETRY = "retry"  # the node, not the series, was at fault (a full disk): queued again
    FAILED = "failed"
    DROPPED = "dropped"  # found on recording: another worker took the job, its run stands


@dataclass(frozen=True)
class Results:
    """What a run made, recorded with its job in one transaction and then announced."""

    deliveries: tuple[Delivery, ...]  # an outbox row per saved file and destination
    reports: tuple[ReportRef, ...]  # the SRs, which a later run of the series names
    paths: tuple[Path, ...]  # the saved files
    findings: tuple[Findings, ...]
    n_instances: int
    supersedes: int | None  # the job of the earlier run whose results these replace


@dataclass(frozen=True)
class Outcome:
    """What a run decided: its ending, the reason the job records, and what it made."""

    ending: Ending
    reason: str | None = None  # the job's recorded reason (a note beside results)
    results: Results | None = None

    def __post_init__(self) -> None:
        if self.ending is Ending.DROPPED:
            raise ValueError("'dropped' is found when recording, never decided by a run")
        if self.ending is Ending.DONE and self.results is None:
            raise ValueError("a 'done' outcome carries its results")
        if self.results is not None and self.ending not in (Ending.DONE, Ending.SKIPPED):
            raise ValueError(f"a '{self.ending}' outcome sends no results")
