"""The words a job's and an outbox item's `state` column may hold, defined once: the schema's
CHECKs (store/schema.py), the SQL in store/ and every caller use these.

A job's states and their moves are drawn in store/jobs.py; an outbox item's in store/outbox.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class JobState(StrEnum):
    """A job's state, as store/jobs.py draws it; the values are what the `state` column
    holds (the schema's CHECK lists the same words, and the SQL here writes them literally:
    a partial index is only used for a query that names its state as a literal)."""

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    QUARANTINED = "quarantined"
    SUPERSEDED = "superseded"


# a job in one of these may still change; one in any other state has ended for good
OPEN_STATES = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING)
ENDED_STATES = tuple(state for state in JobState if state not in OPEN_STATES)


def sql_values(states: Iterable[JobState]) -> str:
    """An SQL list of state literals, `('done', 'failed')`, for `state IN ...`."""
    return "(" + ", ".join(f"'{state}'" for state in states) + ")"


class OutboxState(StrEnum):
    """An outbox item's state; the values are what the `state` column holds (the schema's
    CHECK and the SQL here name the same words)."""

    PENDING = "pending"  # due now or after its backoff
    SENT = "sent"
    DEAD = "dead"  # out of tries or too old: waits for `covid-plugin retry`
