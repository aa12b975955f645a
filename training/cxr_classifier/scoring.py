"""The decision rule applied to films, and proportions with patient-bootstrap CIs.

Shared by `evaluate` and `compare`, so that both score with the node's own `decide`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from covid_plugin.ml.cxr import CLASS_KEYS, decide
from training.common.data import Item
from training.common.metrics import bootstrap_ci


def patient_index(items: list[Item]) -> np.ndarray:
    """Patient ids as integers: the resampling unit of the bootstrap and the probe's CV.

    Not the split's leakage groups: pHash near-duplicates at Hamming 6 chain 228 Kermany films
    into one component, which a group bootstrap or a grouped CV cannot resample sensibly.
    """
    return np.unique([it.patient_id for it in items], return_inverse=True)[1]


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits[:, : len(CLASS_KEYS)]) / temperature, 1).numpy()


def rule_calls(probs: np.ndarray, covid_threshold: float) -> np.ndarray:
    """Class index per film by THE decision rule: the node's own `decide`, film by film."""
    return np.array([CLASS_KEYS.index(decide(dict(zip(CLASS_KEYS, map(float, p), strict=True)),
                                             covid_threshold)) for p in probs], dtype=int)


def share(mask: np.ndarray, groups: np.ndarray) -> dict:
    """A proportion with its patient-bootstrap 95% CI."""
    mask = np.asarray(mask, dtype=bool)
    if len(mask) == 0:
        return {"share": None, "ci95": None, "k": 0, "n": 0}
    return {"share": float(mask.mean()), "k": int(mask.sum()), "n": len(mask),
            "ci95": bootstrap_ci(lambda i: float(mask[i].mean()), groups)}


def with_ci(statistic: Callable[[np.ndarray], float | None], n: int, groups: np.ndarray
            ) -> dict:
    """statistic over all films, and its patient-bootstrap 95% CI."""
    return {"value": statistic(np.arange(n)), "ci95": bootstrap_ci(statistic, groups)}
