"""The CXR films the classifier learns from, their targets, and the uint8 image cache.

Labelled rows of the cxr, cxr_adult and cxr_adult_findings manifests; the findings films
without a 3-class label become "other abnormal" (trained as "not COVID" only).
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from covid_plugin.ml.cxr import CLASS_KEYS, LungCrop, preprocess, to_network_input
from training.common.data import Item, leakage_groups, read_grey, read_manifests, read_pairs

FOLDERS = ("cxr", "cxr_adult", "cxr_adult_findings")
# adult NIH films with findings but no 3-class label (effusion, mass, nodule, ...): trained as
# "not COVID" only (-log(1 - p_covid)), ignored by the 3-class cross-entropy
OTHER_ABNORMAL = "other_abnormal"
FINDINGS_FOLDER = "cxr_adult_findings/"


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

