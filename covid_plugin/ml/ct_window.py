"""The HU window that maps real CT into the 8-bit domain the lesion network was trained on.

The training slices (MedSeg via Inf-Net) are 8-bit images with an unpublished window. The
window was estimated by matching tissue peaks of those slices against real HU series
(training/ct_window.py) and is recorded in models/ct-lesion/spec.json under `intensity`;
this module only applies it, so the node and the calibration share one definition.
"""

from __future__ import annotations

import numpy as np

from covid_plugin.ml.spec import HuWindow


def window_bounds(intensity: HuWindow) -> tuple[float, float]:
    """(lower, upper) HU of a spec's `intensity` block (center and width)."""
    return intensity.center - intensity.width / 2.0, intensity.center + intensity.width / 2.0


def hu_to_unit(hu: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """float32 in [0, 1]: what an 8-bit training slice divided by 255 would hold."""
    out = np.subtract(hu, lower, dtype=np.float32)
    out *= np.float32(1.0 / (upper - lower))
    return np.clip(out, 0.0, 1.0, out=out)


def unit_to_hu(unit: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Approximate HU of an 8-bit training slice (saturated pixels stay at the window edges)."""
    return (lower + np.asarray(unit, np.float32) * np.float32(upper - lower)).astype(np.float32)
