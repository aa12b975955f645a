"""Estimate the HU window of the 8-bit MedSeg slices against real HU series.

Two independent estimates, written to models/ct-lesion/window_calibration.json and plotted:
1. Histogram matching: the (lower, upper) HU window whose 8-bit rendering of the thorax crops of
   the real series (cropped exactly as the node crops them) has the cumulative histogram closest
   (L1) to the pooled histogram of the 98 MedSeg slices. This one is used.
2. Peak fit: the line through the aerated-lung and soft-tissue peaks (8-bit vs HU), as a check;
   fat and bone are then compared with where that line puts them.
The real series are mostly non-COVID lungs while MedSeg lungs are full of GGO, so the lung peak
comparison is biased a little towards denser lung: the card says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from covid_plugin.ml.ct_lesion import thorax_box  # noqa: E402
from covid_plugin.ml.ct_lung import segment_lungs  # noqa: E402
from covid_plugin.ml.spec import HuWindow  # noqa: E402
from training.common.ct_series import load_hu_series  # noqa: E402

CROP_MARGIN = 0.08
FAT_HU, SOFT_TISSUE_RANGE, LUNG_RANGE = -100.0, (0.0, 80.0), (-960.0, -700.0)


def medseg_histogram(data: Path) -> np.ndarray:
    """Pooled, normalised 256-bin histogram of every MedSeg slice."""
    hist = np.zeros(256)
    for path in sorted((data / "ct" / "images" / "medseg_infnet").glob("*.png")):
        with Image.open(path) as img:
            hist += np.bincount(np.asarray(img.convert("L")).ravel(), minlength=256)
    return hist / hist.sum()


def _peak_in(values: np.ndarray, weights: np.ndarray, lo: float, hi: float) -> float:
    """The mode of a smoothed histogram within [lo, hi]."""
    inside = (values >= lo) & (values <= hi)
    smooth = ndi.gaussian_filter1d(weights.astype(float), 2)
    return float(values[inside][np.argmax(smooth[inside])])


def thorax_hu_samples(data: Path, limit: int | None = None, stride: int = 3
                      ) -> tuple[np.ndarray, list[dict]]:
    """HU of the thorax crops of the multi-slice series (subsampled), with per-series peaks."""
    samples, rows = [], []
    # single NY-SBU slices are too little to calibrate on
    for series in [s for s in load_hu_series(data) if s.hu.shape[0] >= 5][:limit]:
        box = thorax_box(segment_lungs(series.hu, series.spacing) > 0, CROP_MARGIN)
        hu = np.clip(series.hu[:, box[0], box[1]], -1024, 2000).ravel()
        samples.append(hu[::stride])
        counts, edges = np.histogram(hu, bins=np.arange(-1025, 1505, 10))
        centres = edges[:-1] + 5
        rows.append({
            "series": series.name,
            "lung_peak_hu": _peak_in(centres, counts, *LUNG_RANGE),
            "soft_tissue_peak_hu": _peak_in(centres, counts, *SOFT_TISSUE_RANGE),
        })
    return np.concatenate(samples), rows


def match_window(hu: np.ndarray, target: np.ndarray) -> tuple[float, float, float]:
    """(lower, upper, L1 distance of CDFs) of the best window on a 10 HU grid."""
    levels = np.arange(-1024, 2001, dtype=np.float64)
    counts = np.bincount(np.round(hu).astype(np.int64) + 1024, minlength=levels.size)
    counts = counts / counts.sum()
    target_cdf = np.cumsum(target)
    best = (np.inf, 0.0, 0.0)
    for lower in range(-1500, -690, 10):
        for upper in range(-100, 510, 10):
            v = np.clip((levels - lower) * (255.0 / (upper - lower)), 0, 255).astype(np.int64)
            cdf = np.cumsum(np.bincount(v, weights=counts, minlength=256))
            distance = float(np.abs(cdf - target_cdf).sum())
            if distance < best[0]:
                best = (distance, float(lower), float(upper))
    return best[1], best[2], best[0]


def estimate_window(data: Path, out: Path, limit: int | None = None) -> HuWindow:
    """The `intensity` block of the lesion spec, plus calibration evidence written beside it.

    `limit` caps the number of HU series (tests); the shipped spec uses all of them.
    """
    target = medseg_histogram(data)
    hu, per_series = thorax_hu_samples(data, limit)
    lower, upper, distance = match_window(hu, target)

    levels = np.arange(256)
    lung8 = _peak_in(levels, target * 1e6, 10, 120)
    soft8 = _peak_in(levels, target * 1e6, 160, 240)
    lung_hu = float(np.median([r["lung_peak_hu"] for r in per_series]))
    soft_hu = float(np.median([r["soft_tissue_peak_hu"] for r in per_series]))
    slope = (soft8 - lung8) / (soft_hu - lung_hu)
    peak_lower = lung_hu - lung8 / slope
    peak_upper = peak_lower + 255.0 / slope
    to8 = lambda h: float((h - lower) * 255.0 / (upper - lower))  # noqa: E731
    calibration = {
        "chosen": {"lower_hu": lower, "upper_hu": upper, "cdf_l1_distance": distance},
        "peak_fit": {
            "lung_peak_8bit": lung8, "soft_tissue_peak_8bit": soft8,
            "lung_peak_hu_median": lung_hu, "soft_tissue_peak_hu_median": soft_hu,
            "lower_hu": peak_lower, "upper_hu": peak_upper,
        },
        "check": {
            "fat_-100HU_in_8bit": to8(FAT_HU),
            "air_-1000HU_in_8bit": max(0.0, to8(-1000.0)),
            "medseg_share_saturated_255": float(target[255]),
            "hu_share_above_upper": float((hu >= upper).mean()),
            "medseg_share_black_0": float(target[0]),
            "hu_share_below_lower": float((hu <= lower).mean()),
        },
        "per_series": per_series,
    }
    (out / "window_calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    _plot(target, hu, lower, upper, out / "window_calibration.png")
    return HuWindow(
        kind="hu_window",
        center=(lower + upper) / 2.0,
        width=upper - lower,
        lower_hu=lower,
        upper_hu=upper,
        scale="unit = clip((HU - lower_hu) / (upper_hu - lower_hu), 0, 1) == 8-bit / 255",
        estimated_by=f"histogram matching of thorax crops of {len(per_series)} real HU series "
                     "to the 98 MedSeg slices; peak fit (lung, soft tissue) gives "
                     f"[{peak_lower:.0f}, {peak_upper:.0f}] HU (window_calibration.json)",
    )


def _plot(target: np.ndarray, hu: np.ndarray, lower: float, upper: float, path: Path) -> None:
    mapped = np.clip((hu - lower) * (255.0 / (upper - lower)), 0, 255).astype(np.uint8)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(target, label="MedSeg 8-bit slices (98)")
    # smoothed: integer HU fall 5 or 6 to an 8-bit level, which draws a comb otherwise
    ax.plot(ndi.gaussian_filter1d(np.bincount(mapped, minlength=256) / mapped.size, 1.5),
            label=f"real HU thorax crops, window [{lower:.0f}, {upper:.0f}] HU (smoothed)")
    ax.set_xlabel("8-bit value")
    ax.set_ylabel("share of pixels")
    ax.set_ylim(0, 0.012)
    ax.legend(fontsize=8)
    ax.set_title("HU window estimate: histograms after mapping")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
