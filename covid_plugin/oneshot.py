"""`covid-plugin run DIR --out OUT`: the node's pipeline on a folder, without the network.

The same selection rules, loader, pipelines and writers as the node, so a folder run is a
faithful preview of what the node would send back.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

from covid_plugin.config import Settings
from covid_plugin.instance import InstanceHeader, InvalidInstance, read_header
from covid_plugin.outputs import write_all
from covid_plugin.pipelines.interface import analyse
from covid_plugin.series import rejection_reason
from covid_plugin.service import load_object
from covid_plugin.store.jobs import SeriesRecord
from covid_plugin.summary import ResultRow
from covid_plugin.worker.results import save_durably

log = logging.getLogger(__name__)


def group_series(folder: Path) -> dict[str, list[tuple[Path, InstanceHeader]]]:
    groups: dict[str, list[tuple[Path, InstanceHeader]]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = read_header(path.read_bytes())
        except InvalidInstance as exc:
            log.info("skipping %s: %s", path.name, exc.reason)
            continue
        groups[header.series_uid].append((path, header))
    return groups


def _record(header: InstanceHeader, n: int) -> SeriesRecord:
    return SeriesRecord(0, header.series_uid, header.study_uid, header.modality,
                        header.sop_class_uid, header.body_part, header.description,
                        header.image_type, "", n, time.time())


def run_folder(folder: Path, out: Path, settings: Settings) -> list[ResultRow]:
    pipelines = {m: p for p in load_object(settings.pipelines)(settings) for m in p.modalities}
    models: dict[str, object] = {}
    rows = []
    for series_uid, members in group_series(folder).items():
        header = members[0][1]
        row = ResultRow(series_uid, header.modality, "rejected", n_files=len(members))
        rows.append(row)
        reason = rejection_reason(_record(header, len(members)), settings.selection)
        pipeline = pipelines.get(header.modality)
        if reason or pipeline is None:
            row.reason = reason or f"no pipeline for modality {header.modality}"
            continue
        if pipeline.name not in models:
            models[pipeline.name] = pipeline.load_models(settings.models_dir, settings.device)
        outcome = analyse(pipeline, models[pipeline.name], [p for p, _ in members], write_all)
        if not outcome.results:
            row.outcome = "skipped" if outcome.skipped == len(outcome.problems) else "failed"
            row.reason = outcome.note or ""
            continue
        datasets = [ds for _, objects in outcome.results for ds in objects]
        saved = save_durably(datasets, out / series_uid)
        row.outcome, row.findings = "done", outcome.results[-1][0]
        row.reason = f"{len(saved)} objects in {out / series_uid}"
    return rows
