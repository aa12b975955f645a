"""The series-level CT COVID-19 rule as a model folder: `python -m training train ct-cls`.

The thresholds below were written down from the radiology consensus description of typical
COVID-19 pneumonia before the rule was run on any series; nothing is fitted (`train` only
writes the spec). `evaluate` runs the node's whole CT path (lungs from HU, lesion UNet, rule)
on every real HU series and reports per-patient AUC and sensitivity/specificity, next to a
burden-only ablation (is the distribution worth anything beyond "how much lesion").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from covid_plugin.ml.ct_cls import CtClassifier, lesion_features, rule_score
from covid_plugin.ml.ct_lesion import LesionSegmenter
from covid_plugin.ml.ct_lung import segment_lungs
from training.ct_series import SOURCES, load_hu_series
from training.metrics import bootstrap_auc, plot_roc, sensitivity_specificity

REPO = Path(__file__).resolve().parents[1]

THRESHOLDS = {
    "burden_low_pct": 0.5,  # below: no more than the network's false-positive level
    "burden_high_pct": 3.0,
    "side_low_pct": 0.1,  # the less involved lung: bilateral above side_high_pct
    "side_high_pct": 1.0,
    "peripheral_mm": 20.0,  # lesion voxel within this distance of the lung border = peripheral
    "peripheral_low": 0.4,
    "peripheral_high": 0.8,
    "ggo_low": 0.4,  # GGO share of lesion volume
    "ggo_high": 0.8,
    "w_base": 0.25,
    "w_bilateral": 0.25,
    "w_peripheral": 0.25,
    "w_ggo": 0.25,
    "decision": 0.5,
}


def options(extra: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training train|evaluate ct-cls")
    parser.add_argument("--lesion-model", type=Path, default=REPO / "models" / "ct-lesion")
    return parser.parse_args(list(extra))


def spec() -> dict:
    return {
        "name": "ct-classifier",
        "version": "1.0.0",
        "task": "classification",
        "weights": None,
        "weights_sha256": None,
        "labels": [
            {"key": "covid", "value": "840539006", "scheme": "SCT", "meaning": "COVID-19"},
            {"key": "non_covid", "value": "260385009", "scheme": "SCT", "meaning": "Negative"},
        ],
        "input": {
            "lung": "ct-lung labels (1 right, 2 left)",
            "lesion": "ct-lesion labels (1 GGO, 2 consolidation)",
            "level": "series",
        },
        "intensity": {},
        "spacing": None,
        "thresholds": THRESHOLDS,
        "rule": "score = ramp(involvement%, burden_low, burden_high) * (w_base + "
                "w_bilateral*ramp(min(right%, left%)) + w_peripheral*ramp(peripheral fraction) + "
                "w_ggo*ramp(GGO fraction)); covid if score >= decision. Not calibrated.",
        "depends_on": ["ct-lung", "ct-lesion"],
        "data": {
            "evaluated_on": [f"{name}: {licence}" for name, licence in SOURCES.values()],
            "split": "nothing fitted; thresholds set a priori; all series are evaluation",
        },
    }


def train(args: argparse.Namespace) -> int:
    out = Path(args.out or REPO / "models" / "ct-classifier")
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec(), indent=2) + "\n")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    opts = options(args.extra)
    data, out = Path(args.data), Path(args.out or REPO / "models" / "ct-classifier")
    classifier = CtClassifier.load(out)
    segmenter = LesionSegmenter.load(opts.lesion_model)
    rows = {}
    for series in load_hu_series(data)[: args.limit]:
        lung = segment_lungs(series.hu, series.spacing)
        lesion = segmenter.predict(series.hu, lung)
        features = lesion_features(lung, lesion, series.spacing,
                                   classifier.spec.thresholds["peripheral_mm"])
        burden_only = dict(classifier.spec.thresholds, w_base=1.0, w_bilateral=0.0,
                           w_peripheral=0.0, w_ggo=0.0)
        rows[series.name] = {
            "label": series.label,
            "covid": series.label == "covid",
            "slices": int(series.hu.shape[0]),
            **features,
            "score": classifier.predict(lung, lesion, series.spacing)["covid"],
            "score_burden_only": rule_score(features, burden_only),
        }
    y = np.array([r["covid"] for r in rows.values()], int)
    score = np.array([r["score"] for r in rows.values()])
    burden = np.array([r["score_burden_only"] for r in rows.values()])
    decided = score >= classifier.spec.thresholds["decision"]
    metrics = {
        "model": {"name": "ct-classifier", "version": classifier.spec.version,
                  "lesion_model_sha256": segmenter.spec.weights_sha256},
        "unit": "patient (one series per patient)",
        "n_patients": int(len(y)), "n_covid": int(y.sum()),
        "rule": {"auc": bootstrap_auc(y, score, seed=args.seed),
                 **sensitivity_specificity(y, decided)},
        "burden_only": {"auc": bootstrap_auc(y, burden, seed=args.seed),
                        **sensitivity_specificity(y, burden >= 0.5)},
        "per_patient": rows,
        "note": "8 patients (3 COVID, 2 of them single slices); the CI shows how little this "
                "says. Thresholds fixed before evaluation.",
    }
    plot_roc([("rule", y, score), ("burden only", y, burden)],
             f"CT COVID-19 rule, per patient (n={len(y)})", out / "roc_per_patient.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    spec_json = json.loads((out / "spec.json").read_text())
    spec_json["metrics"] = {
        "auc_per_patient": metrics["rule"]["auc"]["auc"],
        "sensitivity": metrics["rule"]["sensitivity"],
        "specificity": metrics["rule"]["specificity"],
        "on": f"{len(y)} patients ({int(y.sum())} COVID); details in metrics.json",
    }
    (out / "spec.json").write_text(json.dumps(spec_json, indent=2) + "\n")
    from training.ct_cards import write_cls_card

    write_cls_card(out, classifier.spec, metrics)
    return 0
