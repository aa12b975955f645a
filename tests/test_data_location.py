"""Tests find the shared data through one place, which honours COVID_PLUGIN_DATA, and every
test that reads it says so with the `data` mark (conftest skips those, with one message, where
the data set is absent)."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

HARD_CODED = re.compile(r'/ "shared" / "data"|"\.\./shared/data"|parents\[\d\][^\n]*"shared"')
# what tests/conftest.py offers that points into the data set
DATA_NAMES = {"DATA", "CHEST_CR", "RIDER_CT", "rider_files"}


def test_no_test_hard_codes_the_data_location():
    exempt = ("conftest.py", "test_data_location.py")
    offenders = [p.name for p in sorted((REPO / "tests").glob("*.py"))
                 if p.name not in exempt and HARD_CODED.search(p.read_text())]
    assert offenders == [], "use `from tests.conftest import DATA` (COVID_PLUGIN_DATA)"


def _mentions(node: ast.AST) -> set[str]:
    """The names a definition uses; a function's parameters count (they name fixtures), and
    so do the words of its strings (a fixture named in `parametrize` for `getfixturevalue`,
    a helper imported by a `python -c` child), docstrings apart."""
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    if isinstance(node, ast.FunctionDef):
        names |= {a.arg for a in node.args.args}
    docstrings = {id(n.body[0].value) for n in ast.walk(node)
                  if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.body
                  and isinstance(n.body[0], ast.Expr)}
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            names |= set(re.findall(r"\w+", n.value))
    return names


def _is_data_mark(node: ast.expr) -> bool:
    return ast.unparse(node) == "pytest.mark.data"


def unmarked_data_tests(source: str) -> list[str]:
    """Test functions of a module that reach the data set, directly or through the module's
    helpers, fixtures and constants, without the `data` mark (on them or on the module)."""
    tree = ast.parse(source)
    definitions: dict[str, ast.AST] = {}
    module_marked = False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            definitions[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    definitions[target.id] = node
                    if target.id == "pytestmark":
                        module_marked = any(map(_is_data_mark, ast.walk(node.value)))
    reaches = set(DATA_NAMES)
    grew = True
    while grew:
        grew = False
        for name, node in definitions.items():
            if name not in reaches and _mentions(node) & reaches:
                reaches.add(name)
                grew = True
    return [name for name, node in definitions.items()
            if name.startswith("test_") and name in reaches and isinstance(node, ast.FunctionDef)
            and not module_marked and not any(map(_is_data_mark, node.decorator_list))]


def test_every_test_that_reads_the_data_set_is_marked_data():
    unmarked = [f"{path.relative_to(REPO)}::{name}"
                for path in sorted((REPO / "tests").rglob("test_*.py"))
                if path.name != "test_data_location.py"  # names the data set in its checks
                for name in unmarked_data_tests(path.read_text())]
    assert unmarked == [], "mark these `@pytest.mark.data` (they fail without the data set)"


def test_the_mark_check_follows_fixtures_and_helpers():
    source = (
        "import pytest\n"
        "from tests.conftest import rider_files\n"
        "FIRST = rider_files(1)\n"
        "@pytest.fixture\n"
        "def series():\n    return FIRST\n"
        "def test_reads(series):\n    assert series\n"
        "@pytest.mark.data\n"
        "def test_marked(series):\n    assert series\n"
        "def test_no_data():\n    assert True\n"
        "@pytest.mark.parametrize('name', ['series'])\n"
        "def test_by_name(name, request):\n    assert request.getfixturevalue(name)\n"
    )
    assert unmarked_data_tests(source) == ["test_reads", "test_by_name"]
    assert unmarked_data_tests("import pytest\npytestmark = pytest.mark.data\n" + source) == []
