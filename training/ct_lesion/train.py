"""Train the CT lesion UNet: `python -m training train ct-lesion --out models/ct-lesion`.

Data: the 98 MedSeg slices (8-bit, unknown window) with GGO/consolidation masks, split as
Inf-Net split them (50 train, 48 test). MedSeg gives no patient ids, so slices of one patient
may sit on both sides of that split: every metric here carries that caveat.
Strong MONAI augmentation (affine, flip, intensity scale/shift/gamma standing in for the
unknown window, noise, blur standing in for JPEG and resampling) because 50 slices is little.
Every `--checkpoint-every` steps a checkpoint lands in cache/ct-lesion/, which `--resume`
continues from; a finished run resumed just rewrites the model folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import set_determinism
from tqdm import tqdm

from covid_plugin.ml.ct_lesion import build_network
from covid_plugin.ml.device import resolve_device
from covid_plugin.ml.spec import sha256_of
from training.common.paths import REPO
from training.ct_lesion.data import INPUT_SIZE, load_slices
from training.ct_lesion.window import estimate_window

log = logging.getLogger(__name__)

CHANNELS = (16, 32, 64, 128, 256)
WEIGHTS = "model.pt"


def options(extra: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training train|evaluate ct-lesion")
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared box)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps")
    parser.add_argument("--cache", type=Path, default=REPO / "cache" / "ct-lesion")
    return parser.parse_args(list(extra))



def warmup_cosine(step: int, total: int) -> float:
    """LR factor: linear warm-up over 5% of the steps, then cosine to zero at `total`.

    A plain function of (step, total), so a run resumed with a new --max-steps follows the
    new total instead of a schedule frozen into the checkpoint.
    """
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def augmentations(seed: int) -> Compose:
    keys = ("image", "label")
    transform = Compose(
        [
            RandAffined(
                keys, prob=0.8, rotate_range=0.26, scale_range=(0.2, 0.2), shear_range=0.05,
                translate_range=(16, 16), mode=("bilinear", "nearest"), padding_mode="zeros",
            ),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandScaleIntensityd("image", factors=0.15, prob=0.5),
            RandShiftIntensityd("image", offsets=0.08, prob=0.5),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
            RandGaussianSmoothd("image", sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0), prob=0.2),
            RandGaussianNoised("image", std=0.03, prob=0.3),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


def train(args: argparse.Namespace) -> int:
    opts = options(args.extra)
    torch.set_num_threads(opts.threads)
    set_determinism(seed=args.seed)
    device = resolve_device(args.device)
    data, out = Path(args.data), Path(args.out or REPO / "models" / "ct-lesion")
    out.mkdir(parents=True, exist_ok=True)
    opts.cache.mkdir(parents=True, exist_ok=True)

    slices = load_slices(data, "train", args.limit)
    steps_per_epoch = max(1, int(np.ceil(len(slices) / opts.batch_size)))
    total = args.max_steps or opts.epochs * steps_per_epoch
    network = build_network(CHANNELS).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=opts.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, partial(warmup_cosine, total=total))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    step = 0
    ckpt = opts.cache / "last.ckpt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed at step %d of %d", step, total)
    transform = augmentations(args.seed + step)
    rng = np.random.default_rng(args.seed + step)

    network.train()
    progress = tqdm(total=total, initial=step, desc="ct-lesion", unit="step")
    while step < total:
        batch_idx = rng.choice(len(slices), size=min(opts.batch_size, len(slices)), replace=False)
        batch = [transform({"image": slices[i]["image"], "label": slices[i]["label"]})
                 for i in batch_idx]
        x = torch.stack([torch.as_tensor(b["image"]) for b in batch]).clamp(0, 1).to(device)
        y = torch.stack([torch.as_tensor(b["label"]) for b in batch]).round().to(device)
        loss = loss_fn(network(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if step % opts.checkpoint_every == 0 or step == total:
            torch.save(
                {
                    "network": network.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step,
                    "torch_rng": torch.get_rng_state(),
                },
                ckpt,
            )
    progress.close()
    network.cpu()
    torch.save(network.state_dict(), out / WEIGHTS)
    write_spec(out, data, n_train=len(slices), steps=total, limit=args.limit)
    return 0


def write_spec(out: Path, data: Path, n_train: int, steps: int, limit: int | None) -> None:
    """spec.json from the weights and the HU window calibration (training/ct_lesion/window.py)."""
    window = estimate_window(data, out, limit)
    spec = {
        "name": "ct-lesion",
        "version": "1.0.0",
        "task": "segmentation",
        "weights": WEIGHTS,
        "weights_sha256": sha256_of(out / WEIGHTS),
        "labels": [
            # DICOM CID 6102/6104 code; no SNOMED CT concept could be verified offline
            {"key": "ggo", "value": "112120", "scheme": "DCM", "meaning": "Ground glass opacity"},
            {"key": "consolidation", "value": "95436008", "scheme": "SCT",
             "meaning": "Lung consolidation"},
        ],
        "input": {
            "size": INPUT_SIZE,
            "channels": list(CHANNELS),
            "network": "monai.networks.nets.UNet 2D, 3 classes, num_res_units=1",
            "crop": "thorax: bounding box of the lung mask (ct-lung) + crop_margin on each side",
            "crop_margin": 0.08,
            "resize": "longer side to size (bilinear, antialias), shorter side zero-padded",
            "slices": "2D, every axial slice, batched",
        },
        "intensity": window,
        "spacing": None,
        # the network's own operating point until `evaluate ct-lesion` chooses both on the
        # real HU patients (training/common/ct_lopo.py)
        "thresholds": {"lesion_probability": 0.5, "min_lesion_ml": 0.0},
        "output": {"0": "none", "1": "ggo", "2": "consolidation", "restricted_to": "ct-lung",
                   "postprocess": "softmax, [1,2,2,2,1]/8 low-pass (decoder checkerboard), "
                                  "bilinear resize, lesion where P(GGO)+P(consolidation) >= "
                                  "lesion_probability, 3D lesions < min_lesion_ml dropped"},
        "data": {
            "sources": [{
                "name": "MedSeg COVID-19 CT segmentation (SIRM images), Inf-Net export",
                "doi": "10.6084/m9.figshare.13521488",
                "licence": "CC0-1.0 (MedSeg) + Inf-Net non-commercial (export)",
            }],
            "split": "Inf-Net's own: 50 train, 48 test slices; no patient ids, so slices of one "
                     "patient may be on both sides",
            "n_train": n_train,
            "steps": steps,
        },
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
