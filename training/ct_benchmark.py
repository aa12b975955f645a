"""Time and peak memory of the whole CT model path on a long real series.

`python -m training.ct_benchmark --data ../shared/data --slices 300` stacks the 60-slice RIDER
series (real 512 x 512 HU) to the requested length, then runs lungs -> lesions -> classifier
as the node does and prints seconds per stage and the peak RSS of this process (JSON).
Run it alone on the machine: the numbers are only as quiet as the CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from covid_plugin.ml.ct_cls import CtClassifier
from covid_plugin.ml.ct_lesion import LesionSegmenter
from covid_plugin.ml.ct_lung import segment_lungs
from training.common.ct_series import load_hu_series
from training.common.paths import REPO


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m training.ct_benchmark")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", type=Path, default=REPO / "models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    segmenter = LesionSegmenter.load(args.models / "ct-lesion")
    classifier = CtClassifier.load(args.models / "ct-classifier")
    series = load_hu_series(args.data, ["tcia-rider-pilot_0117_chest-ct-nsclc"])[0]
    reps = int(np.ceil(args.slices / series.hu.shape[0]))
    hu = np.concatenate([series.hu] * reps)[: args.slices]
    del series.hu
    timings = {}
    start = time.perf_counter()
    lung = segment_lungs(hu, (0.8, 0.644531, 0.644531))
    timings["lungs_s"] = time.perf_counter() - start
    start = time.perf_counter()
    lesion = segmenter.predict(hu, lung)
    timings["lesions_s"] = time.perf_counter() - start
    start = time.perf_counter()
    probabilities = classifier.predict(lung, lesion, (0.8, 0.644531, 0.644531))
    timings["classifier_s"] = time.perf_counter() - start
    timings["total_s"] = sum(timings.values())
    print(json.dumps({
        "slices": int(hu.shape[0]), "shape": list(hu.shape), "threads": args.threads, **timings,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "volume_mb": hu.nbytes / 2**20, "covid_score": probabilities["covid"],
    }, indent=2))


if __name__ == "__main__":
    main()
