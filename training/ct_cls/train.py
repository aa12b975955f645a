"""`python -m training train ct-cls`: the rule has nothing to fit; write its spec.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from covid_plugin.ml.spec import save_spec
from training.common.paths import REPO
from training.ct_cls.spec import spec


def train(args: argparse.Namespace) -> int:
    out = Path(args.out or REPO / "models" / "ct-classifier")
    out.mkdir(parents=True, exist_ok=True)
    save_spec(out, spec())
    return 0
