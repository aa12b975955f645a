"""The cxr-lung model on real films, its post-processing, and the teacher's allow-list unpickler."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import measure

from covid_plugin.ml.cxr_lungs import CxrLungSegmenter, keep_lungs, lung_bbox
from covid_plugin.ml.spec import ModelIntegrityError
from covid_plugin.volume import load_series_files
from tests.conftest import CHEST_CR, DATA, REPO
from training.cxr_lungs.teacher import (
    TEACHER_FILE,
    AllowListUnpickler,
    TeacherUNet,
    read_teacher_state_dict,
)

MODEL_DIR = REPO / "models" / "cxr-lung"
# one adult PA film (NIH, CC0) and one paediatric AP film (Kermany, CC BY 4.0); and the
# full-resolution MONOCHROME1 JPEG 2000 chest CR, which is nothing like the training JPEGs
REAL_FILMS = [
    "cxr_adult/images/nih/00000002_000.jpg",
    "cxr/images/kermany/normal/train_IM-0307-0001.jpg",
]


@pytest.fixture(scope="module")
def segmenter() -> CxrLungSegmenter:
    return CxrLungSegmenter.load(MODEL_DIR)


def _read(film: str) -> np.ndarray:
    path = DATA / film
    if not path.is_file():
        pytest.skip(f"shared data not present: {path}")
    if path.suffix == ".dcm":  # through the node's own loader: VOI, MONOCHROME1 inverted
        return load_series_files([path]).array[0]
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0


@pytest.mark.data
@pytest.mark.parametrize("film", [*REAL_FILMS, CHEST_CR.relative_to(DATA).as_posix()])
def test_predict_on_a_real_film_gives_two_lungs(segmenter: CxrLungSegmenter, film: str) -> None:
    image = _read(film)
    mask = segmenter.predict(image)
    assert mask.shape == image.shape and mask.dtype == bool
    assert 0.15 <= mask.mean() <= 0.60
    assert measure.label(mask, connectivity=1).max() == 2
    r0, r1, c0, c1 = lung_bbox(mask)
    assert mask[r0:r1, c0:c1].sum() == mask.sum()  # the crop keeps every lung pixel


def test_load_refuses_weights_that_do_not_match_the_spec(tmp_path: Path) -> None:
    for name in ("spec.json", "model.pt"):
        (tmp_path / name).write_bytes((MODEL_DIR / name).read_bytes())
    with open(tmp_path / "model.pt", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelIntegrityError):
        CxrLungSegmenter.load(tmp_path)


def test_keep_lungs_keeps_two_largest_and_fills_holes() -> None:
    mask = np.zeros((60, 60), dtype=bool)
    mask[5:50, 5:25] = True  # right lung, with a hole (dense consolidation)
    mask[20:25, 10:15] = False
    mask[5:45, 35:55] = True  # left lung
    mask[55:58, 55:58] = True  # a marker
    kept = keep_lungs(mask, min_second_fraction=0.1)
    assert kept[22, 12] and not kept[56, 56]
    assert measure.label(kept, connectivity=1).max() == 2


def test_keep_lungs_drops_a_second_blob_too_small_to_be_a_lung() -> None:
    mask = np.zeros((60, 60), dtype=bool)
    mask[5:50, 5:55] = True  # merged lungs
    mask[55:58, 55:58] = True
    assert keep_lungs(mask, min_second_fraction=0.1).sum() == 45 * 50


def test_lung_bbox_adds_margin_and_stays_inside_the_image() -> None:
    mask = np.zeros((100, 200), dtype=bool)
    mask[10:90, 50:150] = True
    assert lung_bbox(mask, margin=0.05) == (5, 95, 40, 160)
    mask[:, :] = False
    mask[0:3, 195:200] = True
    assert lung_bbox(mask, margin=0.1) == (0, 13, 175, 200)
    assert lung_bbox(np.zeros((7, 9), dtype=bool)) == (0, 7, 0, 9)


class _CallsSystem:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo should-never-run",))


def test_allow_list_unpickler_refuses_os_system() -> None:
    payload = pickle.dumps(_CallsSystem(), protocol=2)
    assert b"system" in payload
    with pytest.raises(pickle.UnpicklingError, match="system"):
        AllowListUnpickler(io.BytesIO(payload)).load()


def test_allow_list_unpickler_still_reads_allowed_names() -> None:
    from collections import OrderedDict

    payload = pickle.dumps(OrderedDict(a=1), protocol=2)
    assert AllowListUnpickler(io.BytesIO(payload)).load() == OrderedDict(a=1)


@pytest.mark.skipif(not (REPO / TEACHER_FILE).is_file(), reason="teacher not downloaded")
def test_teacher_tensors_fill_our_rebuild_of_its_network() -> None:
    with open(REPO / TEACHER_FILE, "rb") as fh:
        state = read_teacher_state_dict(fh)
    TeacherUNet().load_state_dict(state, strict=True)
