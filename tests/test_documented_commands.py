"""Every command form README.md shows works exactly as written, and its example config loads.

The README once said `covid-plugin listen --config node.toml`, which exited with
"unrecognized arguments". These tests read the forms from the README itself, so a form
added there is checked without anyone remembering to add it here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from covid_plugin.cli import build_parser
from covid_plugin.config import load_settings
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
_FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _forms(prefixes: tuple[str, ...]) -> list[str]:
    """Commands from code blocks (one per line, comment dropped) and from inline `code`."""
    lines = [line.split("  #")[0].strip()
             for lang, block in _FENCE.findall(README) if lang != "toml"
             for line in block.splitlines()]
    prose = _FENCE.sub("", README)
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    found = [line for line in lines if line.startswith(prefixes)]
    return list(dict.fromkeys(found))


CLI_FORMS = _forms((".venv/bin/covid-plugin ", "covid-plugin "))
PYTHON_FORMS = _forms(("python ",))
MAKE_FORMS = _forms(("make ",))


def test_the_readme_documents_commands():
    assert len(CLI_FORMS) >= 7 and PYTHON_FORMS and MAKE_FORMS


@pytest.mark.parametrize("form", CLI_FORMS)
def test_covid_plugin_form_parses(form: str):
    argv = shlex.split(form)[1:]
    args = build_parser().parse_args(argv)  # SystemExit(2) on "unrecognized arguments"
    assert callable(args.func)


def _expand(form: str) -> list[str]:
    """`train|evaluate cxr|ct-lung` -> every combination; <placeholders> -> an example."""
    form = form.replace("<model>", "cxr")
    words = [re.sub(r"<[^>]+>", "x", w).split("|") for w in shlex.split(form)]
    combos = [[]]
    for options in words:
        combos = [c + [o] for c in combos for o in options]
    return [" ".join(c).replace("--data ../shared/data", "--data .") for c in combos]


@pytest.mark.parametrize("form", PYTHON_FORMS)
def test_python_form_is_accepted(form: str):
    for command in _expand(form):
        argv = shlex.split(command)
        result = subprocess.run([sys.executable, *argv[1:], "--help"], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command}: {result.stderr[-500:]}"


@pytest.mark.parametrize("form", MAKE_FORMS)
def test_make_target_exists(form: str):
    targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
    assert shlex.split(form)[1] in targets


def test_the_readme_example_config_loads(tmp_path: Path, monkeypatch):
    block = next(b for lang, b in _FENCE.findall(README) if lang == "toml")
    (tmp_path / "node.toml").write_text(block)
    monkeypatch.chdir(tmp_path)
    for name in re.findall(r'"([\w.-]+\.(?:pem|key))"', block):  # the TLS files it names
        (tmp_path / name).write_text("placeholder\n")
    settings = load_settings(tmp_path / "node.toml", environ={})
    assert settings.allowed_callers
