"""Job and outbox states are defined once, as enums; the database and the SQL agree with them.

The schema's CHECK constraints and the SQL in the store write the states as literals (a
migration is never edited, and a partial index is only used by a query that names its state
literally): these tests hold those literals to the enums.
"""

from __future__ import annotations

import re
from enum import StrEnum

import pytest

from covid_plugin.store.jobs import JobQueue
from covid_plugin.store.outbox import OutboxState
from covid_plugin.store.states import ENDED_STATES, OPEN_STATES, JobState
from tests.conftest import REPO

STATE_LITERALS = re.compile(r"state\s*(?:=|!=|<>)\s*'(\w+)'|state\s+IN\s*\(([^)]*)\)", re.I)


def _check_values(definition: str) -> set[str]:
    """The quoted words of the CHECK constraint on `state` in a table's definition."""
    check = re.search(r"CHECK\s*\(\(?\s*state\b(.*?)\)\)", definition, re.S | re.I)
    assert check is not None, definition
    return set(re.findall(r"'(\w+)'", check.group(1)))


def _table_definition(db, table: str) -> str:
    conn = db.connection()
    if db.dialect == "sqlite":
        return conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    return conn.execute(
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c JOIN pg_class t "
        "ON t.oid = c.conrelid WHERE t.relname = ? AND c.contype = 'c'", (table,),
    ).fetchone()[0]


@pytest.mark.parametrize(("table", "states"), [("jobs", JobState), ("outbox", OutboxState)])
def test_the_schema_allows_exactly_the_enum_states(db, table: str, states: type[StrEnum]):
    JobQueue(db)  # the schema is made on first use
    assert _check_values(_table_definition(db, table)) == {s.value for s in states}


def test_every_state_the_store_sql_names_is_a_defined_state():
    known = {s.value for s in [*JobState, *OutboxState]}
    named: dict[str, set[str]] = {}
    for path in sorted((REPO / "covid_plugin").rglob("*.py")):
        for equal, listed in STATE_LITERALS.findall(path.read_text()):
            for word in [equal] if equal else re.findall(r"'(\w+)'", listed):
                named.setdefault(word, set()).add(path.name)
    unknown = {word: files for word, files in named.items() if word not in known}
    assert named and not unknown, f"states not in the enums: {unknown}"


def test_every_state_is_open_or_ended():
    assert set(OPEN_STATES) | set(ENDED_STATES) == set(JobState)
    assert not set(OPEN_STATES) & set(ENDED_STATES)
    assert JobState.QUARANTINED in ENDED_STATES and JobState.SUPERSEDED in ENDED_STATES
