"""`python -m training train|evaluate MODEL --data ../shared/data --out models/<name>`."""

from __future__ import annotations

import argparse
import importlib
import sys

# model name -> its package in training/; `train` runs <package>.train.train(args) and
# `evaluate` runs <package>.evaluate.evaluate(args), so only the command asked for is imported
MODELS = {
    "cxr": "training.cxr_classifier",
    "ct-lesion": "training.ct_lesion",
    "ct-lung": "training.ct_lung",
    "ct-cls": "training.ct_cls",
    "cxr-lung": "training.cxr_lungs",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    parser.add_argument("command", choices=["train", "evaluate"])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--data", default="../shared/data", help="the shared data folder")
    parser.add_argument("--out", default=None, help="model folder (default models/<name>)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (tests)")
    parser.add_argument("--limit", type=int, default=None, help="use at most N items (tests)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args, extra = parser.parse_known_args(argv)
    args.extra = extra
    module = importlib.import_module(f"{MODELS[args.model]}.{args.command}")
    return int(getattr(module, args.command)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
