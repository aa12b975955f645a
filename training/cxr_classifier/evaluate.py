"""Evaluate the CXR classifier: `python -m training evaluate cxr --out models/cxr-classifier`.

The product is for adults, so the headline is held-out ADULT patients (the test fold), scored
by the model's one decision rule (`covid_plugin.ml.cxr.decide`, the node's own function):
COVID AUC, ECE, sensitivity/specificity at the rule, the share of other-abnormal adult films
called COVID, and 3-class macro-F1, each with a patient-bootstrap CI. Then leave-one-source-
out (models trained without Hannover or without ieee8023), per-source rows, children in a row
of their own, Grad-CAM "pointing" on NIH radiologist boxes, and a linear source probe.
Nothing here fits anything: temperature and threshold come from the validation split.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import confusion_matrix

from covid_plugin.ml.cxr import CLASS_KEYS, CxrClassifier
from covid_plugin.ml.spec import CxrClassifierSpec, load_spec, save_spec
from training.common.data import make_split
from training.common.metrics import (
    bootstrap_auc,
    expected_calibration_error,
    macro_f1,
    plot_confusion,
    plot_roc,
    reliability_points,
    sensitivity_specificity,
)
from training.common.paths import REPO
from training.cxr_classifier.data import is_adult, load_cache, load_items, other_abnormal, targets
from training.cxr_classifier.model import predict_logits
from training.cxr_classifier.options import options
from training.cxr_classifier.pointing import plot_heatmaps, pointing
from training.cxr_classifier.probes import probe_suite
from training.cxr_classifier.scoring import calibrated, patient_index, rule_calls, share, with_ci

log = logging.getLogger(__name__)
COVID = CLASS_KEYS.index("covid")
GOALS = {"covid_auc": 0.90, "ece": 0.05, "other_abnormal_called_covid": 0.10}
DEFAULT_HOLDOUT_MODELS = ("cxr-holdout-hannover", "cxr-holdout-ieee8023")


def labelled_block(y: np.ndarray, probs: np.ndarray, called: np.ndarray, groups: np.ndarray
                   ) -> dict:
    """3-class films: AUCs, ECE, and sens/spec, macro-F1 and confusion at the rule."""
    block: dict = {"n": len(y),
                   "class_counts": {k: int((y == i).sum()) for i, k in enumerate(CLASS_KEYS)}}
    if len(y) == 0:
        return block
    block["auc_one_vs_rest"] = {k: bootstrap_auc(y == i, probs[:, i], groups)
                                for i, k in enumerate(CLASS_KEYS)}
    block["ece"] = with_ci(lambda i: expected_calibration_error(y[i], probs[i]), len(y), groups)
    block["ece_if_perfectly_calibrated"] = ece_noise_floor(probs)
    block["mean_confidence"] = float(probs.max(1).mean())
    block["argmax_accuracy"] = float((probs.argmax(1) == y).mean())
    block["rule"] = {
        "covid": sensitivity_specificity(y == COVID, called == COVID),
        "covid_sensitivity": with_ci(
            lambda i: _rate(called[i][y[i] == COVID] == COVID), len(y), groups),
        "covid_specificity": with_ci(
            lambda i: _rate(called[i][y[i] != COVID] != COVID), len(y), groups),
        "macro_f1": with_ci(lambda i: macro_f1(y[i], called[i], len(CLASS_KEYS)), len(y),
                            groups),
        "accuracy": float((called == y).mean()),
        "confusion": confusion_matrix(y, called, labels=range(len(CLASS_KEYS))).tolist(),
        "called_share": {k: float((called == i).mean()) for i, k in enumerate(CLASS_KEYS)},
        "called_not_argmax": int((called != probs.argmax(1)).sum()),
    }
    block["argmax_macro_f1"] = macro_f1(y, probs.argmax(1), len(CLASS_KEYS))
    return block


def ece_noise_floor(probs: np.ndarray, n_draws: int = 1000, seed: int = 0) -> dict:
    """The ECE a PERFECTLY calibrated model would show on these films: labels drawn from the
    predicted probabilities themselves. With ~200 films, 15 bins, the estimator is biased
    upwards by sampling noise; this says how much of a measured ECE that noise explains."""
    rng = np.random.default_rng(seed)
    cumulative = probs.cumsum(1)
    draws = [expected_calibration_error(
        (rng.random((len(probs), 1)) > cumulative).sum(1).clip(0, probs.shape[1] - 1), probs)
        for _ in range(n_draws)]
    return {"mean": float(np.mean(draws)), "p95": float(np.percentile(draws, 95))}


def _rate(hits: np.ndarray) -> float | None:
    return float(hits.mean()) if len(hits) else None


def population_block(y: np.ndarray, probs: np.ndarray, called: np.ndarray, groups: np.ndarray,
                     other: np.ndarray) -> dict:
    """Labelled films (3-class) plus other-abnormal films (y = -1): the adult headline."""
    labelled = y >= 0
    block = labelled_block(y[labelled], probs[labelled], called[labelled], groups[labelled])
    negatives = other | (labelled & (y != COVID))
    scored = labelled | other
    block["covid_vs_all_non_covid"] = {
        "what": "COVID vs every non-COVID film incl. other-abnormal",
        "auc": bootstrap_auc(y[scored] == COVID, probs[scored, COVID], groups[scored]),
        "specificity_at_rule": share(called[negatives] != COVID, groups[negatives]),
    }
    block["other_abnormal_called_covid"] = share(called[other] == COVID, groups[other])
    block["other_abnormal_called"] = {k: float((called[other] == i).mean()) if other.any()
                                      else None for i, k in enumerate(CLASS_KEYS)}
    return block


def holdout_models(opts: argparse.Namespace) -> list[Path]:
    """The leave-one-source-out models asked for, else the default ones that exist."""
    if opts.holdout_model:
        return [Path(p) for p in opts.holdout_model]
    return [REPO / "runs" / name for name in DEFAULT_HOLDOUT_MODELS]


def held_out_sources(spec: CxrClassifierSpec) -> list[str]:
    """The sources a model was trained without (none: a spec that records no split)."""
    return spec.split.holdout_sources if spec.split is not None else []


def held_out_source(model_dir: Path, args: argparse.Namespace, opts: argparse.Namespace,
                    out: Path) -> dict | None:
    """COVID vs non-COVID with one COVID source never seen in training.

    Positives: that source's COVID frontals. Negatives: adult non-COVID frontals of the
    held-out patients (NIH normals, pneumonias, other-abnormal, ieee8023 pneumonias) plus the
    held-out source's own non-COVID frontals (ieee8023 pneumonias: same source, no COVID).
    Scored at the held-out model's own rule (its validation threshold).
    """
    if not (model_dir / "spec.json").is_file():
        print(f"held-out-source model {model_dir} is missing; train it with: python -m "
              f"training train cxr --data {args.data} --out {model_dir} --holdout-source SOURCE")
        return None
    spec = load_spec(model_dir, CxrClassifierSpec)
    sources = held_out_sources(spec)
    if not sources:
        return None
    items, groups = load_items(Path(args.data), args.limit, args.seed)
    split = make_split(items, groups, seed=args.seed, holdout_sources=sources)
    cls, _ = targets(items)
    other = other_abnormal(items).numpy()
    patients = patient_index(items)
    usable = (cls.numpy() >= 0) | other
    positives = [i for i in split.holdout
                 if items[i].source in sources and cls[i] == COVID and usable[i]]
    same_source_neg = [i for i in split.holdout
                       if items[i].source in sources and cls[i] != COVID and usable[i]]
    negatives = [i for i in split.test if usable[i] and cls[i] != COVID and is_adult(items[i])]
    idx = np.array(positives + same_source_neg + negatives, dtype=int)
    clf = CxrClassifier.load(model_dir)
    images = load_cache(items, Path(args.data), opts.size, opts.cache, clf.crop)
    probs = calibrated(predict_logits(clf.network, images, idx, torch.device("cpu")),
                       clf.temperature)
    called = rule_calls(probs, clf.covid_threshold)
    y = cls[idx].numpy() == COVID
    g = patients[idx]
    n_pos, n_same = len(positives), len(same_source_neg)
    name = "+".join(sources)
    plot_roc([(f"COVID ({name} held out) vs adult non-COVID", y, probs[:, COVID])],
             f"Held-out source: {name}", out / f"roc_held_out_{name}.png")
    result = {
        "model": str(model_dir.relative_to(REPO)) if model_dir.is_relative_to(REPO)
        else str(model_dir),
        "model_sha256": clf.spec.weights_sha256,
        "holdout_sources": sources,
        "positives": f"{n_pos} COVID frontals of {name}",
        "negatives": f"{n_same} non-COVID frontals of {name} + {len(negatives)} adult "
                     "non-COVID frontals of held-out patients (incl. other-abnormal)",
        "covid_auc": bootstrap_auc(y, probs[:, COVID], g),
        "rule": {"covid_threshold": clf.covid_threshold,
                 "sensitivity": share(called[:n_pos] == COVID, g[:n_pos]),
                 "specificity": share(called[n_pos:] != COVID, g[n_pos:])},
        "held_out_source_called": {k: float((called[:n_pos] == i).mean())
                                   for i, k in enumerate(CLASS_KEYS)},
    }
    if n_same:
        same = slice(0, n_pos + n_same)
        result["covid_auc_same_source_negatives"] = {
            "what": f"{name} COVID vs {name} non-COVID only (no hospital cue between classes)",
            **bootstrap_auc(y[same], probs[same, COVID], g[same]),
        }
    return result


def plot_reliability(y: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """Top-label reliability diagram of the held-out adults."""
    points = reliability_points(y, probs)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
    for conf, acc, n in points:
        ax.annotate(str(n), (conf, acc), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("mean confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability, held-out adults")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_evaluation(args: argparse.Namespace, opts: argparse.Namespace, out: Path) -> dict:
    torch.set_num_threads(opts.threads)
    if opts.loso_only:
        return write_metrics(json.loads((out / "metrics.json").read_text()), args, opts, out)
    data = Path(args.data)
    clf = CxrClassifier.load(out)
    shipped_holdout = held_out_sources(clf.spec)
    items, groups = load_items(data, args.limit, args.seed)
    split = make_split(items, groups, seed=args.seed, holdout_sources=shipped_holdout)
    images = load_cache(items, data, opts.size, opts.cache, clf.crop)
    cls, view = targets(items)
    other_all = other_abnormal(items).numpy()
    patients = patient_index(items)

    test = split.test[(cls[split.test].numpy() >= 0) | other_all[split.test]]
    features = predict_logits(clf.network, images, split.test, torch.device("cpu"),
                              features=True)
    with torch.no_grad():
        logits = clf.network.heads(torch.from_numpy(features)).numpy()
    by_index = dict(zip(split.test.tolist(), logits, strict=True))
    probs = calibrated(np.stack([by_index[i] for i in test]), clf.temperature)
    called = rule_calls(probs, clf.covid_threshold)
    y = cls[test].numpy()
    other = other_all[test]
    g = patients[test]
    adult = np.array([is_adult(items[i]) for i in test])
    sources = np.array([items[i].source for i in test])

    def block(mask: np.ndarray) -> dict:
        return population_block(y[mask], probs[mask], called[mask], g[mask], other[mask])

    negatives = adult & ((other) | ((y >= 0) & (y != COVID)))
    by_covid_source = {
        s: bootstrap_auc(np.r_[np.ones(m.sum()), np.zeros(negatives.sum())],
                         np.r_[probs[m, COVID], probs[negatives, COVID]],
                         np.r_[g[m], g[negatives]])
        for s in sorted(set(sources[y == COVID])) if (m := adult & (y == COVID) &
                                                      (sources == s)).any()}
    metrics: dict = {
        "model": {"name": clf.spec.name, "version": clf.spec.version,
                  "sha256": clf.spec.weights_sha256, "temperature": clf.temperature,
                  "covid_threshold": clf.covid_threshold,
                  "decision_rule": clf.spec.decision_rule},
        "held_out_adults": block(adult),
        "covid_auc_by_covid_source": {
            "what": "one COVID source's held-out films vs every held-out adult non-COVID film",
            **by_covid_source},
        "children": block(~adult),
        "per_source_adults": {s: block(adult & (sources == s))
                              for s in sorted(set(sources[adult]))},
    }

    known = split.test[view[split.test].numpy() >= 0]
    lateral_p = 1 / (1 + np.exp(-np.array([by_index[i][len(CLASS_KEYS)] for i in known])))
    is_lateral = view[known].numpy() == 1
    metrics["view"] = {
        "n": len(known), "laterals": int(is_lateral.sum()),
        "lateral_auc": bootstrap_auc(is_lateral, lateral_p, patients[known]),
        "at_threshold": {"threshold": clf.view_threshold, **sensitivity_specificity(
            is_lateral, lateral_p >= clf.view_threshold)},
    }
    adult_features = features[np.isin(split.test, test[adult])]
    metrics["source_probe"] = probe_suite(adult_features, images, items, test[adult], patients,
                                          args.seed)
    # pointing: NIH pneumonia films the model never trained on (test, and validation, which
    # only set the temperature and the threshold; the boxes played no part in either)
    metrics["pointing"] = {
        "test": pointing(clf, items, test[adult], data, patients),
        "test_and_validation": pointing(clf, items, np.concatenate([test[adult], split.val]),
                                        data, patients),
    }

    a_lab = adult & (y >= 0)
    plot_roc([(k, y[a_lab] == i, probs[a_lab, i]) for i, k in enumerate(CLASS_KEYS)]
             + [("covid vs all incl. other-abnormal", y[adult] == COVID, probs[adult, COVID])],
             "One-vs-rest ROC, held-out adults", out / "roc_held_out_adults.png")
    plot_confusion(y[a_lab], called[a_lab], CLASS_KEYS,
                   "Confusion at the shipped rule, held-out adults",
                   out / "confusion_held_out_adults.png")
    plot_reliability(y[a_lab], probs[a_lab], out / "reliability_held_out_adults.png")
    plot_heatmaps(clf, items, test, data, out / "gradcam_examples.png")

    return write_metrics(metrics, args, opts, out)


def write_metrics(metrics: dict, args: argparse.Namespace, opts: argparse.Namespace, out: Path
                  ) -> dict:
    """Adds the leave-one-source-out section and the summary; writes metrics.json and the
    summary into spec.json."""
    loso = [held_out_source(m, args, opts, out) for m in holdout_models(opts)]
    metrics["leave_one_source_out"] = {"+".join(r["holdout_sources"]): r for r in loso if r}
    metrics["summary"] = summarise(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    spec = load_spec(out, CxrClassifierSpec)
    save_spec(out, spec.model_copy(update={"metrics": metrics["summary"]}))
    return metrics


def summarise(metrics: dict) -> dict:
    """The headline numbers (held-out adults, at the shipped rule) and the issue's goals."""
    adults = metrics["held_out_adults"]
    auc = adults.get("auc_one_vs_rest", {}).get("covid", {}).get("auc")
    ece = adults.get("ece", {}).get("value")
    other = adults["other_abnormal_called_covid"]["share"]
    summary = {
        "covid_auc_held_out_adults": auc,
        "covid_auc_held_out_adults_incl_other_abnormal":
            adults["covid_vs_all_non_covid"]["auc"]["auc"],
        "ece_held_out_adults": ece,
        "covid_sensitivity_specificity_at_rule": adults.get("rule", {}).get("covid"),
        "other_abnormal_called_covid": other,
        "macro_f1_at_rule_held_out_adults": adults.get("rule", {}).get("macro_f1", {})
        .get("value"),
        "leave_one_source_out_covid_auc": {
            k: v["covid_auc"]["auc"] for k, v in metrics["leave_one_source_out"].items()},
        "pointing_called_class_any_box": metrics["pointing"]["test"].get("any_box", {})
        .get("heatmap_of_called_class", {}).get("share"),
    }
    summary["goals_met"] = {
        "covid_auc>=0.90": auc is not None and auc >= GOALS["covid_auc"],
        "ece<=0.05": ece is not None and ece <= GOALS["ece"],
        "other_abnormal_called_covid<=0.10":
            other is not None and other <= GOALS["other_abnormal_called_covid"],
    }
    return summary


def evaluate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    opts = options(args.extra)
    out = Path(args.out or "models/cxr-classifier")
    metrics = run_evaluation(args, opts, out)
    log.info("metrics: %s", json.dumps(metrics["summary"], indent=1))
    return 0
