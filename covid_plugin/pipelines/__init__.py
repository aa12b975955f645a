"""Pipelines: a loaded series -> Findings. The worker picks one by modality.

interface.py says what a pipeline is and runs one over a series' files (`analyse`, for the
worker and `covid-plugin run` alike); nothing here imports the worker, node/ or store/.
"""

from __future__ import annotations

from covid_plugin.config import Settings


def default_pipelines(settings: Settings) -> list:
    """The shipped pipelines: chest X-ray (CR/DX) and chest CT."""
    # lazy: torch and the model code load only when the node builds its pipelines, not when
    # pipelines.codes is imported (by summary.py)
    from covid_plugin.pipelines.ct import CtPipeline
    from covid_plugin.pipelines.cxr import CxrPipeline

    return [CxrPipeline(settings.cxr_population), CtPipeline(batch_size=settings.ct.batch_size)]
