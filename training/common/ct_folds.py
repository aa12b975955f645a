"""Which lesion model may judge what: every figure from a model that never trained on it.

The lesion network trains on the six whole COVID-CT-MD chests and the MedSeg training slices.
Two fold models (`python -m training train ct-lesion --fold A|B`) each leave out one COVID-19,
one CAP and one normal chest and half of the MedSeg training slices; the shipped model (`all`)
leaves out nothing. Evaluation judges a COVID-CT-MD patient, and a MedSeg training slice, with
the fold model that left it out, and every other series (Lung-PET-CT-Dx, RIDER, the MedSeg test
slices) with the shipped model, which never saw them either.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from covid_plugin.ml.ct_lesion import LesionSegmenter
from training.common.paths import REPO

# two folds by patient, each with one COVID-19, one CAP and one normal chest
FOLDS = {"A": ("P001", "cap001", "normal001"), "B": ("P002", "cap002", "normal002")}
FOLD_ROOT = REPO / "cache" / "ct-lesion"
SHIPPED = REPO / "models" / "ct-lesion"


def fold_dir(fold: str, root: Path = FOLD_ROOT) -> Path:
    return root / f"fold-{fold}"


def held_out_by(fold: str) -> tuple[str, ...]:
    """The COVID-CT-MD patients a fold's model did not train on ("all": none)."""
    return () if fold == "all" else FOLDS[fold]


def medseg_held_out(index: int, fold: str) -> bool:
    """Fold A holds out the even MedSeg training slices, fold B the odd ones, `all` none."""
    return fold != "all" and index % 2 == (0 if fold == "A" else 1)


def patient_of(series: str) -> str:
    """The COVID-CT-MD subject of a series folder name (P002, covid-ct-md_P002,
    ct-covid_covid-ct-md-P002); other series are their own name."""
    for prefix in ("covid-ct-md_", "covid-ct-md-"):
        if prefix in series:
            return series.rsplit(prefix, 1)[1]
    return series


def fold_of(series: str) -> str | None:
    patient = patient_of(series)
    return next((fold for fold, names in FOLDS.items() if patient in names), None)


class OutOfFold:
    """Lesion segmenters by what they judge; fold models from `root`, the shipped from `shipped`.

    Without fold models (a smoke run, or before they are trained) everything is judged by the
    shipped model and `complete` is False, which evaluation writes next to every figure.
    """

    def __init__(self, shipped: Path = SHIPPED, root: Path = FOLD_ROOT):
        self.shipped, self.root = shipped, root
        self.complete = all((fold_dir(f, root) / "spec.json").is_file() for f in FOLDS)

    @cache  # noqa: B019 - one instance per evaluation, a handful of models
    def _load(self, folder: Path) -> LesionSegmenter:
        return LesionSegmenter.load(folder)

    def model_dir(self, fold: str | None) -> Path:
        if fold is None or fold == "all" or not self.complete:
            return self.shipped
        return fold_dir(fold, self.root)

    def for_series(self, series: str) -> LesionSegmenter:
        return self._load(self.model_dir(fold_of(series)))

    def for_fold(self, fold: str) -> LesionSegmenter:
        return self._load(self.model_dir(fold))
