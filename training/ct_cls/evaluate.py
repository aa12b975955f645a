"""The series-level CT COVID-19 rule as a model folder: `python -m training evaluate ct-cls`.

The ramps (training/common/ct_rule.py) were set before the rule met any series. Each
COVID-CT-MD patient's lesions come from the lesion fold model that never trained on that
patient (training/common/ct_folds.py). The decision threshold, and the lesion network's
probability threshold and smallest lesion, are chosen
leave-one-patient-out (training/common/ct_lopo.py): `evaluate` runs the node's whole CT path
(lungs from HU, lesion UNet, rule) on every real HU patient, judges each with the thresholds
chosen on the others, reports LOPO AUC and sensitivity/specificity next to a burden-only
ablation, writes the decision chosen on all patients into spec.json, and says how the normal
sample series is called.
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
from covid_plugin.ml.spec import CtRuleThresholds, save_spec
from training.common import ct_lopo
from training.common.ct_folds import FOLD_ROOT, OutOfFold
from training.common.ct_series import read_series
from training.common.metrics import bootstrap_auc, plot_roc, sensitivity_specificity
from training.common.paths import REPO
from training.ct_cls.card import write_cls_card
from training.ct_cls.spec import spec

NORMAL_SAMPLE = REPO / "dicom_samples" / "ct-normal_covid-ct-md-normal002"


def options(extra: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training train|evaluate ct-cls")
    parser.add_argument("--lesion-model", type=Path, default=REPO / "models" / "ct-lesion")
    parser.add_argument("--lesion-folds", type=Path, default=FOLD_ROOT,
                        help="folder of the lesion fold models (fold-A, fold-B)")
    return parser.parse_args(list(extra))


def call_sample(segmenter: LesionSegmenter, rule: CtRuleThresholds, chosen: dict) -> dict:
    """The normal sample series (dicom_samples) through the node's path with given thresholds."""
    hu, spacing, _ = read_series(NORMAL_SAMPLE)
    lung = segment_lungs(hu, spacing)
    _, lesion = segmenter.predict_with_decision(
        hu, lung, spacing, (chosen["lesion_probability"], chosen["min_lesion_ml"]))
    features = lesion_features(lung, lesion, spacing, rule.peripheral_mm)
    score = rule_score(features, rule)
    return {"thresholds": chosen, "score": score, "called_covid": score >= chosen["decision"],
            "lesion_ml": float((lesion > 0).sum() * np.prod(spacing) / 1000.0),
            "involvement_percent": features["involvement_percent"]}


def evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    opts = options(args.extra)
    data, out = Path(args.data), Path(args.out or REPO / "models" / "ct-classifier")
    classifier = CtClassifier.load(out)
    rule = classifier.spec.thresholds
    judge = OutOfFold(opts.lesion_model, opts.lesion_folds)
    segmenter = judge.for_fold("all")
    patients = ct_lopo.load_patients(data, judge.for_series, rule, limit=args.limit)
    lopo = ct_lopo.leave_one_patient_out(patients)
    chosen = ct_lopo.choose(patients)
    burden_rule = rule.model_copy(
        update={"w_base": 1.0, "w_bilateral": 0.0, "w_peripheral": 0.0, "w_ggo": 0.0})
    rows = {}
    for patient, row in zip(patients, lopo, strict=True):
        fold = row["chosen"]
        result = patient.settings[(fold["lesion_probability"], fold["min_lesion_ml"])]
        rows[patient.name] = {
            "label": patient.label, "covid": patient.covid, "slices": patient.slices,
            **{k: result[k] for k in ("involvement_percent", "right_percent", "left_percent",
                                      "peripheral_fraction", "ggo_fraction", "lesion_ml")},
            "chosen_without_it": fold,
            "score": row["score"], "called_covid": row["called_covid"],
            "score_burden_only": rule_score(result, burden_rule),
        }
    y = np.array([r["covid"] for r in rows.values()], int)
    score = np.array([r["score"] for r in rows.values()])
    burden = np.array([r["score_burden_only"] for r in rows.values()])
    decided = np.array([r["called_covid"] for r in rows.values()])
    normal002 = next((row["chosen"] for row in lopo if row["patient"] == "normal002"), chosen)
    metrics = {
        "model": {"name": "ct-classifier", "version": classifier.spec.version,
                  "lesion_model_sha256": segmenter.spec.weights_sha256},
        "unit": "patient (one series per patient)",
        "n_patients": int(len(y)), "n_covid": int(y.sum()),
        "lopo": {"auc": bootstrap_auc(y, score, seed=args.seed),
                 **sensitivity_specificity(y, decided)},
        "burden_only_auc": bootstrap_auc(y, burden, seed=args.seed),
        "chosen_on_all_patients": chosen,
        "per_patient": rows,
        "normal_sample": {
            "series": "dicom_samples/ct-normal_covid-ct-md-normal002 (30 slices of normal002)",
            "thresholds_chosen_without_normal002": call_sample(
                judge.for_series(NORMAL_SAMPLE.name), rule, normal002),
            "shipped_thresholds": call_sample(segmenter, rule, chosen),
        },
        "note": "each patient judged with the lesion threshold, smallest lesion and decision "
                "chosen on the other patients, on lesions from the lesion fold model that did not "
                "train on it; the AUC pools scores from different folds. Only series the node "
                "scores (no single slices). Few patients: the CI shows how little this says.",
        "lesion_models_out_of_fold": judge.complete,
    }
    plot_roc([("rule (LOPO)", y, score), ("burden only", y, burden)],
             f"CT COVID-19 rule, leave-one-patient-out (n={len(y)})", out / "roc_per_patient.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # the decision, and the decision's own lesion mask (burden features), apart from
    # ct-lesion's measurement mask
    thresholds = CtRuleThresholds.model_validate({
        **rule.model_dump(), **{k: chosen[k] for k in ("decision", "lesion_probability",
                                                        "min_lesion_ml")}})
    save_spec(out, classifier.spec.model_copy(update={
        "thresholds": thresholds,
        "thresholds_use": (
            "decision: lesion_probability and min_lesion_ml build the lesion mask the rule's "
            "features are computed on (not the mask the node writes and measures, which is "
            "ct-lesion's measurement setting); decision is the score threshold; all three "
            "chosen leave-one-patient-out (training/common/ct_lopo.py), shipped as chosen on "
            "all patients"),
        "data": {**(classifier.spec.data or {}), "split": spec().data["split"]},
        "metrics": {
            "auc_lopo": metrics["lopo"]["auc"]["auc"],
            "sensitivity_lopo": metrics["lopo"]["sensitivity"],
            "specificity_lopo": metrics["lopo"]["specificity"],
            "on": f"{len(y)} patients ({int(y.sum())} COVID), leave-one-patient-out; details "
                  "in metrics.json",
        },
    }))
    write_cls_card(out, CtClassifier.load(out).spec, metrics)
    return 0
