"""Wrappers around the external DICOM validators, for any test that writes DICOM objects.

dciodvfy (dicom3tools) checks an object against its IOD; dsrdump (DCMTK) parses an SR content
tree; dcmpschk (DCMTK) checks a presentation state's syntax and semantics. All are Debian
packages; tests that need them are skipped where they are missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DCIODVFY = shutil.which("dciodvfy")
DSRDUMP = shutil.which("dsrdump")
DCMPSCHK = shutil.which("dcmpschk")

requires_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) missing")
requires_dsrdump = pytest.mark.skipif(DSRDUMP is None, reason="dsrdump (DCMTK) missing")
requires_dcmpschk = pytest.mark.skipif(DCMPSCHK is None, reason="dcmpschk (DCMTK) missing")


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of dciodvfy's report that start with "Error" (warnings are not failures)."""
    result = subprocess.run(
        [str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    report = result.stdout + result.stderr
    return [line for line in report.splitlines() if line.startswith("Error")]


def dsrdump(path: Path) -> str:
    """The SR as text; raises AssertionError if DCMTK cannot parse it."""
    result = subprocess.run(
        [str(DSRDUMP), "--print-long-values", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"dsrdump failed ({result.returncode}): {result.stderr}"
    return result.stdout


def dcmpschk_passes(path: Path) -> bool:
    """Whether DCMTK's presentation state checker accepts the object ("Test passed.")."""
    result = subprocess.run(
        [str(DCMPSCHK), str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    return result.returncode == 0 and "Test passed." in result.stdout + result.stderr
