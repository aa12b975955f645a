"""What needs a person, read from the store: results that will not be delivered, jobs no
worker will run, series that will not be processed.

Each check names what it found (series UIDs, job ids), so that an administrator can act on
it (`covid-plugin retry`, `requeue`, ask the PACS to resend). A site may demote any check to
a warning (`health.warn_only`): the report still lists it, and health stays ok.
"""

from __future__ import annotations

import time

from covid_plugin.config import Settings
from covid_plugin.series import completion, delivered_cleanly
from covid_plugin.store.associations import Associations
from covid_plugin.store.jobs import JobQueue, JobState
from covid_plugin.store.outbox import Outbox


def _named(uids: list[str], limit: int = 5) -> str:
    more = f" and {len(uids) - limit} more" if len(uids) > limit else ""
    return ", ".join(uids[:limit]) + more


def attention(settings: Settings, jobs: JobQueue, outbox: Outbox,
              associations: Associations) -> dict[str, str]:
    """Check name -> what is wrong, for every check that found something."""
    found: dict[str, str] = {}
    if dead := outbox.dead_series():
        found["dead_results"] = (f"results not delivered and no longer tried (dead) for series "
                                 f"{_named(dead)}: `covid-plugin retry --all` once the "
                                 "destination is back")
    waiting = jobs.due()
    if waiting and not associations.live_workers():
        found["no_worker"] = f"{waiting} job(s) waiting and no live worker to run them"
    overdue, held = [], []
    t, quiet = time.time(), settings.quiet_period_s
    active = associations.active_series()
    for series in jobs.open_series():
        if series.series_uid in active or t - series.last_at < quiet:
            continue
        state = completion(series, t, quiet, active, 0.0, settings.jobs.incomplete_timeout_s)
        if state != "wait":
            if t - series.last_at > quiet + settings.health.overdue_after_s:
                overdue.append(series.series_uid)
        elif not delivered_cleanly(series):
            held.append(series.series_uid)
    if overdue:
        found["overdue_series"] = (f"series complete but not taken up for more than "
                                   f"{settings.health.overdue_after_s:g} s: {_named(overdue)}")
    if held:
        found["held_series"] = (f"series held as possibly incomplete (the transfer broke off), "
                                f"waiting for the sender to resend: {_named(held)}")
    if incomplete := jobs.incomplete_series():
        found["incomplete_series"] = (f"series not processed because the transfer broke off "
                                      f"and was not resent: {_named(incomplete)}")
    if quarantined := jobs.in_state(JobState.QUARANTINED):
        found["quarantined_jobs"] = (
            "job(s) quarantined: "
            + _named([f"{j.id} (series {j.series_uid})" for j in quarantined])
            + "; `covid-plugin requeue ID` once the cause is fixed")
    return found


def problems_and_warnings(settings: Settings, found: dict[str, str]
                          ) -> tuple[list[str], list[str]]:
    """What fails health, and what the site chose to hear of only as a warning."""
    problems = [text for check, text in found.items() if check not in settings.health.warn_only]
    warnings = [text for check, text in found.items() if check in settings.health.warn_only]
    return problems, warnings
