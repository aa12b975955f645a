"""A job's Outcome, on its own: the labels dashboards read, and the outcomes a run may decide."""

from __future__ import annotations

import pytest

from covid_plugin.worker.outcome import Ending, Outcome, Results

RESULTS = Results(deliveries=(), reports=(), paths=(), findings=(), n_instances=3,
                  supersedes=None)


def test_endings_are_the_metric_labels_dashboards_read():
    assert [e.value for e in Ending] == ["done", "skipped", "retry", "failed", "dropped"]
    assert f"{Ending.DONE}" == "done"  # as the job's log line prints it


@pytest.mark.parametrize(("ending", "reason", "results"), [
    (Ending.DONE, None, RESULTS),
    (Ending.SKIPPED, "skipped by the cxr pipeline: lateral", RESULTS),  # declined, report sent
    (Ending.SKIPPED, "skipped by the cxr pipeline: lateral", None),
    (Ending.RETRY, "no space to write results (No space left on device)", None),
    (Ending.FAILED, "no result", None),
])
def test_a_run_may_decide_these(ending: Ending, reason: str | None, results: Results | None):
    assert Outcome(ending, reason, results).results is results


@pytest.mark.parametrize(("ending", "results", "message"), [
    (Ending.DROPPED, None, "found when recording"),  # a lost lease, seen only on writing
    (Ending.DONE, None, "carries its results"),
    (Ending.FAILED, RESULTS, "sends no results"),
    (Ending.RETRY, RESULTS, "sends no results"),
])
def test_a_run_cannot_decide_these(ending: Ending, results: Results | None, message: str):
    with pytest.raises(ValueError, match=message):
        Outcome(ending, "reason", results)
