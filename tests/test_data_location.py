"""Tests find the shared data through one place, which honours COVID_PLUGIN_DATA."""

from __future__ import annotations

import re

from tests.conftest import REPO

HARD_CODED = re.compile(r'/ "shared" / "data"|"\.\./shared/data"|parents\[\d\][^\n]*"shared"')


def test_no_test_hard_codes_the_data_location():
    exempt = ("conftest.py", "test_data_location.py")
    offenders = [p.name for p in sorted((REPO / "tests").glob("*.py"))
                 if p.name not in exempt and HARD_CODED.search(p.read_text())]
    assert offenders == [], "use `from tests.conftest import DATA` (COVID_PLUGIN_DATA)"
