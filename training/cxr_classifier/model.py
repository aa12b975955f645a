"""The network applied to cached films: logits or pooled features, without augmentation."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from covid_plugin.ml.cxr import CLASS_KEYS, FEATURES, CxrNet
from training.cxr_classifier.data import network_batch


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

