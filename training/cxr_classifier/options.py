"""The CXR classifier's own flags, after the common ones of `python -m training`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from covid_plugin.ml.cxr import INPUT_SIZE
from training.common.paths import REPO

DEFAULT_CACHE = REPO / "cache"


def options(extra: Sequence[str]) -> argparse.Namespace:
    """CXR-specific flags that follow the common ones of `python -m training`."""
    parser = argparse.ArgumentParser(prog="python -m training train|evaluate cxr")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--epoch-samples", type=int, default=640, help="balanced draws/epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=INPUT_SIZE)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (shared box)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--holdout-source", action="append", default=[],
        help="a source kept out of training entirely (repeatable), e.g. hannover",
    )
    parser.add_argument(
        "--train-seed", type=int, default=None,
        help="seed of initialisation, sampling and augmentation only (default: --seed, which "
             "also fixes the split): repeats a recipe on the same test patients",
    )
    parser.add_argument(
        "--lung-crop", type=Path, default=None,
        help="a cxr-lung model folder: crop every film to its lung box (v2); default: no crop",
    )
    parser.add_argument("--lung-margin", type=float, default=0.05,
                        help="margin around the lung box, as a fraction of the film's size")
    parser.add_argument(
        "--paediatric", choices=("exclude", "include"), default="exclude",
        help="Kermany children in training and validation (default exclude: the product is "
             "for adults; children are still scored, in their own row)",
    )
    parser.add_argument(
        "--loso-only", action="store_true",
        help="evaluate: only (re)score the leave-one-source-out models into the existing "
             "metrics.json (a held-out model finished after the main evaluation)",
    )
    parser.add_argument("--other-weight", type=float, default=1.0,
                        help="weight of the -log(1 - p_covid) loss on other-abnormal adult films")
    parser.add_argument(
        "--holdout-model", type=Path, action="append", default=[],
        help="evaluate: a model trained without one source (repeatable; default: "
             "runs/cxr-holdout-hannover and runs/cxr-holdout-ieee8023 where present)",
    )
    return parser.parse_args(list(extra))
