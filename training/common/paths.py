"""The repository root, from which default model, cache and sample folders are found."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
