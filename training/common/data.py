"""Manifest reading and leakage-safe splits shared by the CXR and CT training code.

A split is made over *groups*, not images: one group is a connected component of the graph
whose edges join images of the same patient and near-duplicate pairs. Near-duplicates mostly
join different patient ids (the same film posted twice under two case ids), so patient ids
alone would leak. A held-out source removes every group that touches it from training, so a
film of that source re-posted under another source cannot slip into the training set.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold


@dataclass(frozen=True)
class Item:
    """One manifest row; `path` is relative to the data folder."""

    path: str
    source: str
    patient_id: str
    label: str
    view: str
    paediatric: str
    licence: str
    age: float | None = None  # years, where the manifest gives one


def _age(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def read_manifests(data: Path, folders: Iterable[str]) -> list[Item]:
    items: list[Item] = []
    for folder in folders:
        with open(Path(data) / folder / "manifest.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                items.append(
                    Item(
                        path=row["path"],
                        source=row["source"],
                        patient_id=row["patient_id"],
                        label=row["label"],
                        view=row["view"],
                        paediatric=row["paediatric"],
                        licence=row["licence"],
                        age=_age(row.get("age") or ""),
                    )
                )
    return items


def read_pairs(csv_path: Path) -> list[tuple[str, str]]:
    """Near-duplicate pairs (path_a, path_b); a missing file means no pairs."""
    if not Path(csv_path).is_file():
        return []
    with open(csv_path, newline="") as fh:
        return [(row["path_a"], row["path_b"]) for row in csv.DictReader(fh)]


def leakage_groups(items: Sequence[Item], pairs: Iterable[tuple[str, str]]) -> np.ndarray:
    """Group id per item: connected components over same-patient and near-duplicate edges."""
    index = {item.path: i for i, item in enumerate(items)}
    first_of_patient: dict[str, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    for i, item in enumerate(items):
        rows.append(i)
        cols.append(first_of_patient.setdefault(item.patient_id, i))
    for a, b in pairs:
        if a in index and b in index:  # pairs may name files held back by the data maintainers
            rows.append(index[a])
            cols.append(index[b])
    n = len(items)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


@dataclass(frozen=True)
class Split:
    """Indices into the item list. `holdout` is the whole held-out source (never trained on)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    holdout: np.ndarray


def make_split(
    items: Sequence[Item],
    groups: np.ndarray,
    seed: int = 0,
    folds: int = 7,
    holdout_sources: Iterable[str] = (),
) -> Split:
    """Group-aware, (source, label)-stratified train/val/test; one fold each for val and test.

    Folds are drawn over all groups first and groups that touch a held-out source are moved
    out afterwards, so models with and without a held-out source share the same test patients.
    """
    strata = [f"{item.source}:{item.label}" for item in items]
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.empty(len(items), dtype=int)
    with warnings.catch_warnings():
        # a stratum smaller than `folds` (3 adult normals in ieee8023) just lands in fewer folds
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, fold) in enumerate(splitter.split(np.zeros(len(items)), strata, groups)):
            fold_of[fold] = k
    held = set(holdout_sources)
    held_groups = {g for item, g in zip(items, groups, strict=True) if item.source in held}
    in_holdout = np.isin(groups, list(held_groups))
    return Split(
        train=np.flatnonzero((fold_of >= 2) & ~in_holdout),
        val=np.flatnonzero((fold_of == 1) & ~in_holdout),
        test=np.flatnonzero((fold_of == 0) & ~in_holdout),
        holdout=np.flatnonzero(in_holdout),
    )


def read_grey(path: Path) -> np.ndarray:
    """An image file as float32 (rows, cols) in [0, 1], as the node hands images to a model."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
