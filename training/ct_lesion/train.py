"""Train the CT lesion network: `python -m training train ct-lesion [--fold A|B|all]`.

What it learns from, in every batch:
- MedSeg slices (8-bit, the calibrated window maps real HU onto them): any-lesion outlines,
  Dice + cross-entropy on 160 px crops centred on lesion or lung;
- normal lung (training/ct_lesion/hu_slices.py): slices of the normal chests and slices the
  radiologists labelled "no infection", as the node feeds them: an all-background target, and
  the slice's most confident lung pixels pushed towards "no lesion";
- disease without outlines: slices labelled "infection", whole (a crop might miss the lesion),
  whose most confident lung pixels are pushed towards "lesion" (a multiple-instance loss:
  the mean of the top `--top-k` lesion probabilities inside the lung against the label).
Augmentation: small rotations, scale, flips, intensity scale/shift/gamma, blur, noise.

`--fold A` (or B) trains without that fold's patients and without half of the MedSeg training
slices, so evaluation can judge each patient and each selection slice with a model that never
saw it; `all` is the model the node ships. Every `--checkpoint-every` steps a checkpoint lands
in the cache, which `--resume` continues from.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import set_determinism
from tqdm import tqdm

from covid_plugin.ml.ct_lesion import FEATURES, build_network, lesion_probability
from covid_plugin.ml.device import resolve_device
from covid_plugin.ml.spec import (
    GGO_BAND_HU,
    CtLesionInput,
    CtLesionOutput,
    CtLesionSpec,
    CtLesionThresholds,
    HuWindow,
    LabelSpec,
    save_spec,
    sha256_of,
)
from training.common.ct_folds import fold_dir, medseg_held_out
from training.common.paths import REPO
from training.ct_lesion import hu_slices
from training.ct_lesion.data import INPUT_SIZE, load_slices
from training.ct_lesion.window import estimate_window

log = logging.getLogger(__name__)

WEIGHTS = "model.pt"
CROP_MARGIN = 0.08
KEYS = ("image", "label", "lung")


def options(extra: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training train|evaluate ct-lesion")
    parser.add_argument("--fold", choices=("A", "B", "all"), default="all")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--medseg-per-batch", type=int, default=4)
    parser.add_argument("--negatives-per-batch", type=int, default=2)
    parser.add_argument("--positives-per-batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=160, help="px of the outlined/negative crops")
    parser.add_argument("--top-k", type=int, default=32, help="lung pixels in the slice loss")
    parser.add_argument("--slice-weight", type=float, default=0.5)
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


def augmentations(seed: int, crop: int | None, centre_on: str) -> Compose:
    """Geometry on image, label and lung alike; `crop` px around a `centre_on` pixel."""
    steps = [
        RandAffined(
            KEYS, prob=0.8, rotate_range=0.2, scale_range=(0.15, 0.15), shear_range=0.03,
            translate_range=(12, 12), mode=("bilinear", "nearest", "nearest"),
            padding_mode="zeros",
        ),
        RandFlipd(KEYS, prob=0.5, spatial_axis=1),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.05, prob=0.5),
        RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=0.3),
        RandGaussianSmoothd("image", sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0), prob=0.2),
        RandGaussianNoised("image", std=0.02, prob=0.3),
    ]
    if crop:
        steps.append(RandCropByPosNegLabeld(KEYS, label_key=centre_on, spatial_size=(crop, crop),
                                            pos=2.0, neg=1.0, num_samples=1))
    transform = Compose(steps)
    transform.set_random_state(seed=seed)
    return transform


class Pools:
    """What one fold trains on: outlined MedSeg slices, negative and positive HU slices."""

    def __init__(self, data: Path, spec: CtLesionSpec, fold: str, limit: int | None):
        medseg = load_slices(data, "train", limit)
        self.medseg = [
            {"image": s["image"], "label": (s["label"] > 0).float(), "lung": s["valid"].float()}
            for i, s in enumerate(medseg) if not medseg_held_out(i, fold)]
        names = hu_slices.training_patients(fold)[:limit]
        self.negatives: list[dict] = []
        self.positives: list[dict] = []
        for patient in hu_slices.load_patients(data, names, spec):
            for i in range(len(patient.infected)):
                item = {"image": patient.image[i].float(),
                        "label": torch.zeros_like(patient.image[i], dtype=torch.float32),
                        "lung": patient.lung[i].float()}
                (self.positives if patient.infected[i] else self.negatives).append(item)
        self.patients = list(names)

    def describe(self) -> dict:
        return {"medseg_slices": len(self.medseg), "negative_slices": len(self.negatives),
                "positive_slices": len(self.positives), "hu_patients": self.patients}


def _stack(items: list[dict], key: str, device: torch.device) -> torch.Tensor:
    return torch.stack([torch.as_tensor(item[key]) for item in items]).to(device)


def slice_loss(logits: torch.Tensor, lung: torch.Tensor, infected: bool, top_k: int
               ) -> torch.Tensor:
    """BCE of the mean of each slice's `top_k` lesion probabilities inside the lung."""
    probability = lesion_probability(logits) * (lung[:, 0] > 0.5)
    top = probability.flatten(1).topk(top_k, dim=1).values.mean(dim=1).clamp(1e-4, 1 - 1e-4)
    return F.binary_cross_entropy(top, torch.full_like(top, float(infected)))


def sample(pool: list[dict], n: int, transform: Compose, rng: np.random.Generator
           ) -> list[dict]:
    if n <= 0 or not pool:
        return []
    out = []
    for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False):
        item = transform(dict(pool[i]))
        out.append(item[0] if isinstance(item, list) else item)
    return out


def train(args: argparse.Namespace) -> int:
    opts = options(args.extra)
    torch.set_num_threads(opts.threads)
    set_determinism(seed=args.seed)
    device = resolve_device(args.device)
    data = Path(args.data)
    default_out = (REPO / "models" / "ct-lesion" if opts.fold == "all"
                   else fold_dir(opts.fold, opts.cache))
    out = Path(args.out or default_out)
    out.mkdir(parents=True, exist_ok=True)
    cache = opts.cache / f"run-{opts.fold}"
    cache.mkdir(parents=True, exist_ok=True)

    window = estimate_window(data, out, args.limit)
    spec = lesion_spec(window)
    pools = Pools(data, spec, opts.fold, args.limit)
    log.info("fold %s: %s", opts.fold, pools.describe())
    total = args.max_steps or opts.steps
    network = build_network(FEATURES).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=opts.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, partial(warmup_cosine, total=total))
    outline_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    step = 0
    segments: list[list[int]] = []  # [from step, to step, schedule total] per run segment
    ckpt = cache / "last.ckpt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        step = state["step"]
        segments = state.get("segments", [[0, step, step]])
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed at step %d of %d", step, total)
    segments.append([step, step, total])
    seed = args.seed + step
    outlined = augmentations(seed, opts.crop, "label")
    normal = augmentations(seed + 1, opts.crop, "lung")
    whole = augmentations(seed + 2, None, "lung")
    rng = np.random.default_rng(seed)

    network.train()
    progress = tqdm(total=total, initial=step, desc=f"ct-lesion {opts.fold}", unit="step",
                    mininterval=30)
    while step < total:
        cropped = (sample(pools.medseg, opts.medseg_per_batch, outlined, rng)
                   + sample(pools.negatives, opts.negatives_per_batch, normal, rng))
        n_outlined = min(opts.medseg_per_batch, len(pools.medseg))
        x = _stack(cropped, "image", device).clamp(0, 1)
        logits = network(x)
        loss = outline_loss(logits, _stack(cropped, "label", device).round())
        if len(cropped) > n_outlined:  # the negatives' most lesion-like lung pixels
            loss = loss + opts.slice_weight * slice_loss(
                logits[n_outlined:], _stack(cropped[n_outlined:], "lung", device), False,
                opts.top_k)
        positives = sample(pools.positives, opts.positives_per_batch, whole, rng)
        if positives:
            loss = loss + opts.slice_weight * slice_loss(
                network(_stack(positives, "image", device).clamp(0, 1)),
                _stack(positives, "lung", device), True, opts.top_k)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        segments[-1][1] = step
        if step % opts.checkpoint_every == 0 or step == total:
            torch.save(
                {
                    "network": network.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step,
                    "segments": segments,
                    "torch_rng": torch.get_rng_state(),
                },
                ckpt,
            )
    progress.close()
    network.cpu()
    torch.save(network.state_dict(), out / WEIGHTS)
    write_spec(out, spec, pools.describe(), steps=total, fold=opts.fold, segments=segments)
    return 0


def lesion_spec(window: HuWindow) -> CtLesionSpec:
    """The spec before any weights: the training HU slices go through its input path, and
    `write_spec` adds the weights and what the run trained on."""
    return CtLesionSpec(
        version="2.1.0",
        task="segmentation",
        labels=[
            # DICOM CID 6102/6104 code; no SNOMED CT concept could be verified offline
            LabelSpec(key="ggo", value="112120", scheme="DCM", meaning="Ground glass opacity"),
            LabelSpec(key="consolidation", value="95436008", scheme="SCT",
                      meaning="Lung consolidation"),
        ],
        input=CtLesionInput(
            size=INPUT_SIZE,
            features=FEATURES,
            network="monai.networks.nets.BasicUNet 2D, background/lesion, "
                    "upsample=nontrainable (bilinear)",
            crop="thorax: bounding box of the lung mask (ct-lung) + crop_margin on each side",
            crop_margin=CROP_MARGIN,
            resize="longer side to size (bilinear, antialias), shorter side zero-padded",
            slices="2D, every axial slice, batched",
        ),
        intensity=window,
        spacing=None,
        # the network's own operating point until `evaluate ct-lesion` chooses the measurement
        # setting out of fold (training/ct_lesion/tradeoff.py)
        thresholds=CtLesionThresholds(lesion_probability=0.5, min_lesion_ml=0.0,
                                      min_mean_probability=0.0),
        output=CtLesionOutput.model_validate({
            "0": "none", "1": "ggo", "2": "consolidation", "restricted_to": "ct-lung",
            "ggo_band_hu": GGO_BAND_HU,
            "postprocess": "softmax, bilinear resize, lesion where P(lesion) >= "
                           "lesion_probability and Gaussian-smoothed (1 px) HU >= "
                           f"{GGO_BAND_HU[0]:.0f}; GGO below {GGO_BAND_HU[1]:.0f} HU, "
                           "consolidation from there; 3D lesions < min_lesion_ml or "
                           "with mean probability < min_mean_probability dropped"}),
    )


def write_spec(out: Path, spec: CtLesionSpec, trained_on: dict, steps: int, fold: str,
               segments: list[list[int]]) -> None:
    """spec.json from the weights, the HU window calibration and what the run trained on."""
    save_spec(out, spec.model_copy(update={
        "weights": WEIGHTS,
        "weights_sha256": sha256_of(out / WEIGHTS),
        "data": {
            "sources": [
                {"name": "MedSeg COVID-19 CT segmentation (SIRM images), Inf-Net export",
                 "doi": "10.6084/m9.figshare.13521488",
                 "licence": "CC0-1.0 (MedSeg) + Inf-Net non-commercial (export)"},
                {"name": "COVID-CT-MD (Afshar et al., Sci Data 8:121, 2021): 6 whole chests, "
                         "slice-level infection labels",
                 "licence": "CC-BY-4.0 (unverified)"},
            ],
            "fold": fold,
            "trained_on": trained_on,
            "steps": steps,
            # a run cut short or extended by --resume follows each segment's own total
            "schedule": {"segments": segments},
        },
    }))
