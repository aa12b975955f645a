"""Distil the cheXwhatsApp lung U-Net (MIT) into the small `cxr-lung` MONAI UNet.

The teacher, a whole pickled nn.Module, is loaded safely (never by plain `torch.load`) and its
masks cached in `training.cxr_lungs.teacher`; this module trains the student on them and
then measures it (`training.cxr_lungs.evaluate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised
from tqdm import tqdm

from covid_plugin.ml.cxr_lungs import build_network
from training.cxr_lungs.data import frontal_items, split
from training.cxr_lungs.evaluate import evaluate
from training.cxr_lungs.model import NETWORK, write_model
from training.cxr_lungs.targets import clean_teacher_mask, plausible, student_tensors
from training.cxr_lungs.teacher import cache_teacher_masks

BATCH = 16
STEPS = 1500
CHECKPOINT_EVERY = 100
RUN_DIR = Path("cache/cxr-lung/run")


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
