"""Memory and time of the SEG writer, and of a whole CT run, on a 600-slice CT.

The CT is real RIDER chest slices repeated along z (benchmarks/latency.py's `make_ct`).
- default: the SEG writer alone on synthetic masks (two lungs over 420 slices, two small
  lesion blocks): peak memory traced by Python beyond the masks, and seconds;
- `--one-seg`: the same masks as one four-segment SEG (lesions overlap the lungs), which is
  what the two SEGs avoid;
- `--pipeline`: load + CT pipeline + every writer in one process: peak RSS and seconds.

    python benchmarks/seg_memory.py [--one-seg | --pipeline]
"""

from __future__ import annotations

import argparse
import datetime
import resource
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.latency import make_ct  # noqa: E402
from covid_plugin.findings import Code, Findings, Mask, ModelInfo  # noqa: E402
from covid_plugin.outputs import seg, write_all  # noqa: E402
from covid_plugin.outputs.settings import OutputSettings  # noqa: E402
from covid_plugin.volume import load_series, load_series_files  # noqa: E402

N_SLICES = 600
ANATOMY = Code("123037004", "SCT", "Anatomical Structure")
ALTERED = Code("49755003", "SCT", "Morphologically Altered Structure")
MODEL = ModelInfo("synthetic", "0", "rule-based")


def seg_writer(one_seg: bool) -> str:
    series = load_series(make_ct(N_SLICES))
    stack = np.zeros((4, *series.array.shape), bool)  # segments of one buffer, as ct.py does
    stack[0, 90:510, 150:380, 60:260] = True
    stack[1, 90:510, 150:380, 260:460] = True
    stack[2, 200:260, 200:260, 100:180] = True
    stack[3, 230:240, 300:320, 300:340] = True
    keys = [("lung_right", ANATOMY), ("lung_left", ANATOMY), ("ggo", ALTERED),
            ("consolidation", ALTERED)]
    findings = Findings("ct", series.series_instance_uid, masks=[
        Mask(key, key, category, Code("39607008", "SCT", "Lung"), stack[i], MODEL)
        for i, (key, category) in enumerate(keys)])
    settings = OutputSettings()
    tracemalloc.start()
    started = time.perf_counter()
    if one_seg:
        colours = [(255, 255, 255)] * len(findings.masks)
        segs = [seg._segmentation(findings, findings.masks, colours, series, settings,
                                  datetime.datetime.now(), 1, "one SEG")]
    else:
        segs = seg.segmentations_of(seg.build_segmentations(findings, series, settings))
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    frames = sum(int(s.NumberOfFrames) for s in segs)
    return (f"SEG writer, {N_SLICES} slices: {len(segs)} SEGs, {frames} frames, peak traced "
            f"{peak / 2**20:.0f} MiB beyond the masks, {seconds:.1f} s")


def pipeline() -> str:
    import torch

    from covid_plugin.pipelines.ct import CtPipeline

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, ds in enumerate(make_ct(N_SLICES)):
            paths.append(Path(tmp) / f"{i:04d}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        ct = CtPipeline()
        models = ct.load_models(REPO / "models", "cpu")
        started = time.perf_counter()
        series = load_series_files(paths)
        objects = write_all(ct.run(series, models), series)
        seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (f"load + CT pipeline + writers, {N_SLICES} slices: {len(objects)} objects, "
            f"peak RSS {rss:.0f} MB, {seconds:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", action="store_true", help="the whole CT run")
    parser.add_argument("--one-seg", action="store_true", help="one four-segment SEG")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(pipeline() if args.pipeline else seg_writer(args.one_seg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
