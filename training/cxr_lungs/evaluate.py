"""`python -m training evaluate cxr-lung`: the student against the teacher, held-out patients."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice
from PIL import Image
from skimage.segmentation import find_boundaries
from tqdm import tqdm

from covid_plugin.ml.cxr_lungs import CxrLungSegmenter
from training.cxr_lungs.data import frontal_items, read_grey, split
from training.cxr_lungs.targets import clean_teacher_mask, plausible, read_teacher_mask
from training.cxr_lungs.teacher import TEACHER_SIZE, cache_teacher_masks

# overlays shipped with the card come only from sources whose licence allows redistribution
OVERLAY_SOURCES = ("nih_cxr14", "kermany", "hannover")


def evaluate(args: Any) -> int:
    """Dice of the shipped model (post-processed) against the teacher on held-out patients."""
    torch.set_num_threads(1)
    data, out = Path(args.data), Path(args.out or "models/cxr-lung")
    items = frontal_items(data)[: args.limit]
    cache_teacher_masks(data, items)
    train_items, test_items = split(data, items, args.seed)
    segmenter = CxrLungSegmenter.load(out)
    rows, seconds, written = [], [], set()
    for item in tqdm(test_items, desc="evaluate", mininterval=10):
        image = read_grey(data / item.path)
        started = time.perf_counter()
        mask = segmenter.predict(image)
        seconds.append(time.perf_counter() - started)
        teacher = torch.from_numpy(read_teacher_mask(item))[None, None]
        dice = compute_dice(torch.from_numpy(mask)[None, None], teacher, ignore_empty=False)
        rows.append(
            {
                "source": item.source,
                "patient": item.patient_id,
                "dice": float(dice),
                "teacher_plausible": plausible(clean_teacher_mask(item)),
            }
        )
        overlay = out / f"overlay_{item.source}.png"
        if item.source in OVERLAY_SOURCES and overlay.name not in written:
            write_overlay(overlay, image, mask, teacher[0, 0].numpy())
            written.add(overlay.name)
    metrics = {
        "model": segmenter.spec.info().__dict__,
        "reference": f"teacher masks (cheXwhatsApp lung U-Net at {TEACHER_SIZE} px, p >= 0.5)",
        "split": f"held-out patient groups (near-duplicates merged), seed {args.seed}",
        "train_images_by_source": dict(collections.Counter(it.source for it in train_items)),
        "dice_by_source": {
            source: _summary(
                [r["dice"] for r in rows if r["source"] == source],
                {r["patient"] for r in rows if r["source"] == source},
            )
            for source in sorted({r["source"] for r in rows})
        },
        "dice_all": _summary([r["dice"] for r in rows], {r["patient"] for r in rows}),
        "dice_where_teacher_plausible": _summary(
            [r["dice"] for r in rows if r["teacher_plausible"]],
            {r["patient"] for r in rows if r["teacher_plausible"]},
        ),
        "test_teacher_masks_implausible": sum(not r["teacher_plausible"] for r in rows),
        "cpu_seconds_per_image": {
            "threads": 1,
            "mean": float(np.mean(seconds)),
            "p95": float(np.percentile(seconds, 95)),
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(results_table(metrics))
    return 0


def results_table(metrics: dict[str, Any]) -> str:
    """The markdown table the card quotes, so that it is copied, not retyped."""
    lines = [
        "| source | train images | test images (patients) | Dice mean | median | 5th pct | min |",
        "|---|---|---|---|---|---|---|",
    ]
    train_counts = metrics["train_images_by_source"]
    rows = [*metrics["dice_by_source"].items(), ("all", metrics["dice_all"])]
    for source, d in rows:
        trained = sum(train_counts.values()) if source == "all" else train_counts.get(source, 0)
        lines.append(
            f"| {source} | {trained} | {d['images']} ({d['patients']}) | {d['mean']:.3f} "
            f"| {d['median']:.3f} | {d['p05']:.3f} | {d['min']:.3f} |"
        )
    return "\n".join(lines)


def write_overlay(path: Path, image: np.ndarray, student: np.ndarray, teacher: np.ndarray) -> None:
    """Grey film, student mask tinted green, teacher outline red: what the card shows."""
    rgb = np.repeat(image[..., None], 3, axis=-1)
    rgb[student, 1] = 0.6 * rgb[student, 1] + 0.4
    rgb[find_boundaries(teacher)] = (1.0, 0.0, 0.0)
    Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(path)


def _summary(values: list[float], patients: set[str]) -> dict[str, float]:
    return {
        "images": len(values),
        "patients": len(patients),
        "mean": float(np.mean(values)),
        "median": float(np.median(values)),
        "p05": float(np.percentile(values, 5)),
        "min": float(np.min(values)),
    }
