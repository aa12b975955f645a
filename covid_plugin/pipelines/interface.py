"""What a pipeline is and how a series' files go through one: the Pipeline protocol, the
exception a pipeline declines a series with, and `analyse` (load, run, write).

The node's worker and `covid-plugin run` (oneshot) both call `analyse`, and the pipelines
raise `SeriesSkipped`: kept here, below both, so that a pipeline never imports the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset

from covid_plugin.findings import Findings
from covid_plugin.outputs import OutputError
from covid_plugin.volume import LoadedSeries, SeriesError, load_series_files

log = logging.getLogger(__name__)


class SeriesSkipped(Exception):
    """A pipeline declines a series it cannot honestly process (a lateral film, say)."""


class Pipeline(Protocol):
    """What the worker needs of a pipeline; ct.py and cxr.py are the real ones.

    A pipeline may set `per_instance = True` to see each instance of a series on its own
    (radiographs: one series can hold a PA and a lateral film).
    """

    name: str
    modalities: tuple[str, ...]

    def load_models(self, models_dir: Path, device: str) -> Any: ...

    def run(self, series: LoadedSeries, models: Any) -> Findings: ...


Writer = Callable[[Findings, LoadedSeries], list[Dataset]]
Decliner = Callable[[LoadedSeries, str], list[Dataset]]  # the "not analysed" report


@dataclass
class Analysis:
    """What came of running one pipeline over one series' files."""

    results: list[tuple[Findings, list[Dataset]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: int = 0

    @property
    def note(self) -> str | None:
        return "; ".join(dict.fromkeys(self.problems)) or None


def analyse(pipeline: Pipeline, models: Any, paths: list[Path], writer: Writer,
            decline: Decliner | None = None) -> Analysis:
    """Load, run and write; a radiograph pipeline sees each film on its own.

    Problems with the input are collected as reasons, not raised: the caller records them.
    With `decline`, a series the pipeline declines still yields a result: the short report
    that says why, sent like any other.
    """
    units = [[p] for p in paths] if getattr(pipeline, "per_instance", False) else [paths]
    out = Analysis()
    for unit in units:
        try:
            series = load_series_files(unit)
            findings = pipeline.run(series, models)
            out.results.append((findings, writer(findings, series)))
        except SeriesError as exc:
            out.problems.append(f"series cannot be loaded: {exc.reason}")
        except SeriesSkipped as exc:
            out.skipped += 1
            out.problems.append(f"skipped by the {pipeline.name} pipeline: {exc}")
            if decline is not None:
                declined = Findings(pipeline.name, series.series_instance_uid,
                                    notes=[f"not analysed: {exc}"])
                try:
                    out.results.append((declined, decline(series, str(exc))))
                except OutputError as error:
                    out.problems.append(f"report cannot be encoded: {error.reason}")
        except OutputError as exc:
            # the library's message can quote a header value (a birth date, a name): the
            # reason, which `covid-plugin jobs` prints, names only the kind of error
            cause = type(exc.__cause__ or exc).__name__
            log.warning("results for series %s cannot be encoded (%s)", exc.series_uid, cause)
            log.debug("encoding error details", exc_info=exc)
            out.problems.append(f"results cannot be encoded ({cause}); details at DEBUG")
    return out
