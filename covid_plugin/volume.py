"""A received series -> one array with geometry, ready for a pipeline.

(The loader is being written; LoadedSeries is the contract pipelines and writers rely on.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom import Dataset


@dataclass
class LoadedSeries:
    """One series as the pipelines see it.

    `array` is float32 with shape (frames, rows, cols): Hounsfield units for CT (frames sorted
    along the slice normal, from the first position to the last), and for CR/DX the displayed
    image (MONOCHROME1 inverted, VOI applied) scaled to [0, 1], one frame.
    `datasets` are the source datasets in the same frame order (pixel data may be dropped to
    save memory); a multi-frame source appears once and `frame_numbers` says which frame each
    array frame came from (1-based), else it is None.
    `spacing` is (slice spacing, row spacing, column spacing) in mm, slice spacing 0 for 2D.
    """

    modality: str
    series_instance_uid: str
    study_instance_uid: str
    array: np.ndarray
    spacing: tuple[float, float, float]
    datasets: list[Dataset]
    frame_numbers: list[int] | None = None
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (6 values) for CT
    positions: list[tuple[float, float, float]] | None = None  # ImagePositionPatient per frame
