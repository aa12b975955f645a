"""`covid-plugin demo` waits until every job has ended and every result has left."""

from __future__ import annotations

from covid_plugin.demo import settled
from covid_plugin.store.jobs import Job, JobState


def _jobs(*states: JobState) -> list[Job]:
    return [Job(i, f"1.2.{i}", state, 1, "PACS", "CT") for i, state in enumerate(states)]


def test_quarantined_and_superseded_jobs_have_ended():
    # the demo's own list once missed these two: such a demo waited out its whole timeout
    assert settled(_jobs(JobState.DONE, JobState.QUARANTINED, JobState.SUPERSEDED), 0)


def test_open_jobs_or_unsent_results_keep_the_demo_waiting():
    for state in (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING):
        assert not settled(_jobs(JobState.DONE, state), 0)
    assert not settled(_jobs(JobState.DONE, JobState.REJECTED), 1)
    assert not settled([], 0)
