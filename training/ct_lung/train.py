"""`python -m training train ct-lung`: nothing to fit; write the rule's spec, then evaluate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.common.paths import REPO
from training.ct_lung.evaluate import evaluate
from training.ct_lung.spec import spec


def train(args: argparse.Namespace) -> int:
    out = Path(args.out or REPO / "models" / "ct-lung")
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec(), indent=2) + "\n")
    return evaluate(args)

