"""A deterministic pipeline for node tests: the real writers, no model.

Its 'probability' is a fixed function of the pixels, so a test can tell a rerun from a new
result; TEST_PIPELINE_DELAY_S makes it slow enough to be killed mid-job, and
TEST_PIPELINE_CRASH_MODALITY=CT makes it kill its own process on a CT series, as running out
of memory would.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from covid_plugin.findings import Classification, ClassProbability, Code, Findings, ModelInfo
from covid_plugin.volume import LoadedSeries

MODEL = ModelInfo("node-test-pipeline", "0", "0" * 64)
COVID = Code("840539006", "SCT", "COVID-19")
NORMAL = Code("17621005", "SCT", "Normal")


class MeanIntensityPipeline:
    name = "test"
    modalities = ("CR", "DX", "CT")

    def load_models(self, models_dir: Path, device: str) -> None:
        return None

    def run(self, series: LoadedSeries, models: None) -> Findings:
        delay = float(os.environ.get("TEST_PIPELINE_DELAY_S", "0"))
        if delay:
            time.sleep(delay)
        if series.modality in os.environ.get("TEST_PIPELINE_CRASH_MODALITY", "").split(","):
            os.kill(os.getpid(), signal.SIGKILL)
        p = float(1 / (1 + np.exp(-float(series.array.mean()) / 1000.0)))
        classification = Classification(
            MODEL, [ClassProbability("covid", COVID, p), ClassProbability("normal", NORMAL, 1 - p)],
            predicted="covid" if p >= 0.5 else "normal",
        )
        return Findings(kind="ct" if series.modality == "CT" else "cxr",
                        series_instance_uid=series.series_instance_uid,
                        classification=classification, models=[MODEL])


def pipelines(settings) -> list:
    return [MeanIntensityPipeline()]
