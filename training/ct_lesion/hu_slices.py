"""The real HU chest series as weakly labelled training slices for the lesion network.

MedSeg's 50 training slices are all from COVID-19 lungs: a network trained on them alone has
never seen a normal lung, and the only way it kept normals clean was a threshold that threw
most of the disease away. The six whole COVID-CT-MD chests bring what it lacks:
- every slice of the two normal chests and every slice the radiologists labelled "no
  infection" in the four others: an all-background target (negatives);
- every slice labelled "infection": a slice-level target only (the lesion is somewhere in
  that slice's lungs, nobody outlined where).
The lung-cancer series (Lung-PET-CT-Dx, RIDER) stay out: a tumour slice is not a negative for
"lesion", and there is no mask to leave the tumour out with.

Each slice reaches the network as the node feeds it (ct_lesion.hu_to_network_input: thorax
crop from the HU lung mask, the calibrated window, longer side to the input size), so training
sees exactly the node's domain. The lung mask travels along: the slice loss looks inside it.
Built once per patient and cached in cache/ct-lesion/hu-slices/ (keyed by the lung code).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covid_plugin.ml import ct_lung
from covid_plugin.ml.ct_lesion import hu_to_network_input, thorax_box, to_network_input
from covid_plugin.ml.spec import CtLesionSpec
from training.common.ct_folds import held_out_by
from training.common.ct_series import FULL_SERIES, read_series, series_slice_labels
from training.common.paths import REPO

CACHE = REPO / "cache" / "ct-lesion" / "hu-slices"
PATIENT_SERIES = {Path(rel).name: rel for rel in FULL_SERIES}


@dataclass
class PatientSlices:
    """One patient's lung-bearing slices in network space."""

    name: str
    image: torch.Tensor  # (N, 1, S, S) float16, [0, 1]
    lung: torch.Tensor  # (N, 1, S, S) bool, the HU lung mask through the same geometry
    infected: torch.Tensor  # (N,) bool, the radiologists' slice label (normals: all False)


def _key(spec: CtLesionSpec, rel: str) -> str:
    code = Path(ct_lung.__file__).read_bytes() + spec.intensity.model_dump_json().encode()
    return hashlib.sha256(code + repr(spec.input.size).encode()
                          + repr(spec.input.crop_margin).encode()
                          + rel.encode()).hexdigest()[:16]


def patient_slices(data: Path, name: str, spec: CtLesionSpec) -> PatientSlices:
    """A patient's slices that hold lung, through the node's own input path (cached)."""
    rel = PATIENT_SERIES[name]
    path = CACHE / f"{name}-{_key(spec, rel)}.pt"
    if path.is_file():
        return PatientSlices(name, **torch.load(path, weights_only=True))
    hu, spacing, positions = read_series(data / rel)
    lung = ct_lung.segment_lungs(hu, spacing)
    labels = series_slice_labels(data).get(name, {})
    keep = np.flatnonzero(lung.any(axis=(1, 2)))
    box = thorax_box(lung, spec.input.crop_margin)
    size = spec.input.size
    image, _ = hu_to_network_input(hu[keep], box, spec)
    lung_in, _ = to_network_input(
        torch.from_numpy((lung[keep][:, box[0], box[1]] > 0).astype(np.float32))[:, None],
        size, mode="nearest")
    infected = torch.tensor([bool(labels.get(round(positions[i], 1), 0)) for i in keep])
    found = {"image": image.half(), "lung": lung_in > 0.5, "infected": infected}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(found, path)
    return PatientSlices(name, **found)


def load_patients(data: Path, names: tuple[str, ...], spec: CtLesionSpec
                  ) -> list[PatientSlices]:
    return [patient_slices(data, name, spec) for name in names]


def training_patients(fold: str) -> tuple[str, ...]:
    return tuple(name for name in PATIENT_SERIES if name not in held_out_by(fold))
