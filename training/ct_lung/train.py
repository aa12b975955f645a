"""`python -m training train ct-lung`: nothing to fit; write the rule's spec, then evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

from covid_plugin.ml.spec import save_spec
from training.common.paths import REPO
from training.ct_lung.evaluate import evaluate
from training.ct_lung.spec import spec


def train(args: argparse.Namespace) -> int:
    out = Path(args.out or REPO / "models" / "ct-lung")
    out.mkdir(parents=True, exist_ok=True)
    save_spec(out, spec())
    return evaluate(args)

