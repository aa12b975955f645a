"""Paired comparison of two CXR classifiers on the same images (v1 against v2, say).

`python -m training.cxr_classifier.compare --data ../shared/data --a models/cxr-classifier
--a-holdout runs/cxr-holdout-hannover --b runs/cxr-v2 --b-holdout runs/cxr-v2-holdout-hannover
--json runs/cxr-v2/comparison.json`

Two models' separate CIs overlap even when one is consistently better, and macro-F1 has no CI
in metrics.json at all. A *paired* patient bootstrap (the same resampled patients scored by
both models) gives a CI of the difference, which is what "not worse beyond the noise" needs.
Each model is scored through its own spec, so a lung-cropped model sees its cropped cache.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score

from covid_plugin.ml.cxr import CLASS_KEYS, CxrClassifier
from covid_plugin.ml.spec import CxrClassifierSpec, load_spec
from training.common.data import Item, make_split
from training.common.metrics import expected_calibration_error
from training.cxr_classifier.data import is_adult, load_cache, load_items, other_abnormal, targets
from training.cxr_classifier.model import predict_logits
from training.cxr_classifier.options import DEFAULT_CACHE
from training.cxr_classifier.probes import source_probe
from training.cxr_classifier.scoring import calibrated, patient_index, rule_calls, share

log = logging.getLogger(__name__)
COVID = CLASS_KEYS.index("covid")
Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def scores(model_dir: Path, items: list[Item], idx: np.ndarray, data: Path, cache: Path
           ) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated class probabilities and pooled features of `model_dir` for items[idx],
    through the model's own preprocessing (its lung crop, if its spec has one)."""
    clf = CxrClassifier.load(model_dir)
    size = clf.spec.input.size
    images = load_cache(items, data, size, cache, clf.crop)
    features = predict_logits(clf.network, images, idx, torch.device("cpu"), features=True)
    with torch.no_grad():
        logits = clf.network.heads(torch.from_numpy(features)).numpy()
    return calibrated(logits, clf.temperature), features


def probabilities(model_dir: Path, items: list[Item], idx: np.ndarray, data: Path,
                  cache: Path) -> np.ndarray:
    return scores(model_dir, items, idx, data, cache)[0]


def weighted_macro_f1(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> float:
    present = sorted(set(y[w > 0].tolist()))
    return float(f1_score(y, probs.argmax(1), labels=present, average="macro",
                          sample_weight=w, zero_division=0))


def weighted_covid_auc(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> float:
    positive = y == COVID
    if not (positive & (w > 0)).any() or not (~positive & (w > 0)).any():
        return float("nan")
    return float(roc_auc_score(positive, probs[:, COVID], sample_weight=w))


def paired_bootstrap(metric: Metric, y: np.ndarray, pa: np.ndarray, pb: np.ndarray,
                     patients: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """metric(b) - metric(a) with a 95% CI over patients resampled with replacement.

    Resampling is done as integer weights per patient, so an image counts as often as its
    patient was drawn, as in the unpaired CIs of metrics.json.
    """
    ones = np.ones(len(y))
    a, b = metric(y, pa, ones), metric(y, pb, ones)
    unique, inverse = np.unique(patients, return_inverse=True)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        counts = np.bincount(rng.integers(0, len(unique), len(unique)), minlength=len(unique))
        w = counts[inverse].astype(float)
        d = metric(y, pb, w) - metric(y, pa, w)
        if np.isfinite(d):
            diffs.append(d)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"a": a, "b": b, "b_minus_a": b - a, "ci95": [float(lo), float(hi)],
            "p_b_worse": float(np.mean(np.array(diffs) < 0)), "n": len(y)}


def compare(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    items, groups = load_items(data, None, args.seed)
    cls, _ = targets(items)
    patients = patient_index(items)
    split = make_split(items, groups, seed=args.seed)
    test = split.test[cls[split.test].numpy() >= 0]
    y = cls[test].numpy()
    pa, fa = scores(args.a, items, test, data, args.cache)
    pb, fb = scores(args.b, items, test, data, args.cache)
    adult = np.array([is_adult(items[i]) for i in test])
    sources = [items[i].source for i in test]
    normal = y == CLASS_KEYS.index("normal")

    def probe(features: np.ndarray) -> dict:
        """The source probe of `evaluate` (no CI: it is a CV accuracy, point estimate)."""
        return {
            "all_sources": source_probe(features, sources, patients[test],
                                        args.seed)["balanced_accuracy"],
            "normals_nih_vs_kermany": source_probe(
                features[normal], [s for s, m in zip(sources, normal, strict=True) if m],
                patients[test][normal], args.seed)["balanced_accuracy"],
        }

    result: dict = {
        "a": str(args.a), "b": str(args.b),
        "method": "paired patient bootstrap (1000), difference b - a, 95% percentile CI",
        "held_out_patients": {
            "macro_f1": paired_bootstrap(weighted_macro_f1, y, pa, pb, patients[test]),
            "covid_auc": paired_bootstrap(weighted_covid_auc, y, pa, pb, patients[test]),
            "ece": {"a": expected_calibration_error(y, pa), "b": expected_calibration_error(y, pb)},
            "source_probe_balanced_accuracy": {"a": probe(fa), "b": probe(fb)},
        },
        "adult_only": {
            "macro_f1": paired_bootstrap(weighted_macro_f1, y[adult], pa[adult], pb[adult],
                                         patients[test][adult]),
            "covid_auc": paired_bootstrap(weighted_covid_auc, y[adult], pa[adult], pb[adult],
                                          patients[test][adult]),
        },
    }
    other_flag = other_abnormal(items).numpy()
    other = [i for i in split.test if other_flag[i] and is_adult(items[i])]
    if other:
        idx = np.array(other, dtype=int)
        result["other_abnormal_called_covid_at_own_rule"] = {
            name: share(rule_calls(probabilities(model, items, idx, data, args.cache),
                                   load_spec(model, CxrClassifierSpec).thresholds.covid) == COVID,
                        patients[idx])
            for name, model in (("a", args.a), ("b", args.b))}
    if args.a_holdout and args.b_holdout:
        held = make_split(items, groups, seed=args.seed, holdout_sources=[args.source])
        positives = [i for i in held.holdout if items[i].source == args.source and cls[i] >= 0]
        negatives = [i for i in held.test if cls[i] >= 0 and items[i].label != "covid"]
        idx = np.array(positives + negatives, dtype=int)
        yh = cls[idx].numpy()
        ha = probabilities(args.a_holdout, items, idx, data, args.cache)
        hb = probabilities(args.b_holdout, items, idx, data, args.cache)
        adult_h = np.array([is_adult(items[i]) for i in idx])
        result["held_out_source"] = {
            "source": args.source, "a": str(args.a_holdout), "b": str(args.b_holdout),
            "covid_auc": paired_bootstrap(weighted_covid_auc, yh, ha, hb, patients[idx]),
            "covid_auc_adult_negatives": paired_bootstrap(
                weighted_covid_auc, yh[adult_h], ha[adult_h], hb[adult_h],
                patients[idx][adult_h]),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.cxr_classifier.compare")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--a", type=Path, required=True, help="the reference model (v1)")
    parser.add_argument("--b", type=Path, required=True, help="the candidate model (v2)")
    parser.add_argument("--a-holdout", type=Path, default=None)
    parser.add_argument("--b-holdout", type=Path, default=None)
    parser.add_argument("--source", default="hannover", help="the source a/b-holdout left out")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = compare(args)
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
