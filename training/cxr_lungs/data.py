"""Frontal CXR films for the lung model, and a split by patient group (near-duplicates merged)."""

from __future__ import annotations

import collections
import csv
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MANIFESTS = ("cxr", "cxr_adult")
# Kermany and NIH are capped so that the teacher's CPU time stays ~25 min and the small adult
# sources (ieee8023, Hannover) are not drowned by paediatric films.
PER_SOURCE_CAP = 260

TEST_FRACTION = 0.2


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


def read_grey(path: Path) -> np.ndarray:
    """An 8-bit CXR as float32 in [0, 1], bones white (as staged)."""
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0

