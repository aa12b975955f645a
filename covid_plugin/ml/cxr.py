"""Chest X-ray classifier: the preprocessing the training and the node share, and inference.

One geometry for every source: the image is stretched to a fixed square WITHOUT keeping its
aspect ratio. The paediatric Kermany films were already squashed to 224x224 by their mirror,
so keeping aspect for the other sources would give the network a free "which source" cue.
Intensity is normalised by percentiles at native resolution (before resizing, so a 12-bit
DICOM keeps its contrast) and then quantised to 8 bits, which is exactly what the training
cache stores: the node and the training loop feed the network identical tensors.

From v2 the film may first be cropped to its lung bounding box (plus a margin) found by the
`cxr-lung` model, when the spec says `"lung_crop": {...}`. The crop removes borders, markers,
text, shoulders and much of the tube and line hardware that differ between hospitals (and
between children and adults), so the one-geometry stretch then acts on the chest alone. The
crop lives here, in `preprocess`, so that the training cache and `CxrClassifier.predict` run
the very same function; a spec without `lung_crop` gives exactly the v1 behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet
from monai.visualize import GradCAM
from torch import nn

from covid_plugin.ml.cxr_lungs import CxrLungSegmenter, lung_bbox
from covid_plugin.ml.device import resolve_device
from covid_plugin.ml.spec import CxrClassifierSpec, LungCropSpec, ModelIntegrityError, load_spec

INPUT_SIZE = 224
PERCENTILES = (0.5, 99.5)
CLASS_KEYS = ("normal", "pneumonia_other", "covid")
VIEW_KEYS = ("frontal", "lateral")
BACKBONE = "efficientnet-lite0"
FEATURES = 1280
# the layer whose activations and gradients make the class-activation map (7x7 at 224)
CAM_LAYER = "cam_point"
# a lung box narrower or shorter than this share of the film is a failed segmentation (a
# marker, a shoulder blob): the whole film is used instead of zooming into the wrong place
MIN_CROP_FRACTION = 0.25
# where a classifier spec's `lung_crop.model` is looked for when it is not a sibling folder
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"

Box = tuple[int, int, int, int]  # (r0, r1, c0, c1), end-exclusive, in the original image


def prepare(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Displayed-orientation grey image (any size, any range) -> uint8 (size, size)."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {image.shape}")
    # np.percentile, not MONAI's ScaleIntensityRangePercentiles: same result, and the MONAI
    # transform costs ~0.1 s per image here (MetaTensor + torch.quantile), which the node pays.
    # Large films (DICOM, 2-3k px) are sampled on a regular grid: the same percentiles to within
    # noise at a tenth of the cost; training images (<= 320 px) use every pixel.
    step = max(1, min(image.shape) // 512)
    low, high = np.percentile(image[::step, ::step], PERCENTILES)
    normalised = (image.astype(np.float32) - low) / max(float(high - low), 1e-6)
    resized = F.interpolate(
        torch.from_numpy(normalised.clip(0, 1))[None, None], size=(size, size), mode="bilinear",
        antialias=True, align_corners=False,
    )[0, 0]
    return (resized.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@dataclass(frozen=True)
class LungCrop:
    """The lung model and margin a classifier was trained with (spec.json `lung_crop`)."""

    segmenter: CxrLungSegmenter
    margin: float

    @classmethod
    def load(cls, folder: Path, margin: float, expected_sha256: str | None = None,
             device: str | torch.device = "cpu") -> LungCrop:
        """The lung model in `folder`; refused if its weights are not `expected_sha256`.

        The classifier learned on crops made by one particular lung model; other weights give
        other boxes, hence inputs it never saw, so a mismatch fails loudly at start-up.
        """
        segmenter = CxrLungSegmenter.load(Path(folder), device)
        if expected_sha256 is not None and segmenter.spec.weights_sha256 != expected_sha256:
            raise ModelIntegrityError(
                f"lung model {folder} has weights sha256 {segmenter.spec.weights_sha256}, but "
                f"the classifier was trained with {expected_sha256}; refusing to load"
            )
        return cls(segmenter, float(margin))

    @classmethod
    def from_spec(cls, block: LungCropSpec, model_dir: Path, device: str | torch.device = "cpu"
                  ) -> LungCrop:
        """The crop a classifier's spec.json names.

        The lung model is sought beside the classifier first (models/<name>), then in the
        repository's models/ (so a classifier trained into runs/ still finds it).
        """
        candidates = [Path(model_dir).resolve().parent / block.model, MODELS_DIR / block.model]
        folder = next((c for c in candidates if (c / "spec.json").is_file()), candidates[-1])
        return cls.load(folder, block.margin, block.weights_sha256, device)

    def box(self, image: np.ndarray) -> Box:
        """Lung bounding box grown by the margin; the whole film if the mask is implausible."""
        rows, cols = image.shape
        r0, r1, c0, c1 = lung_bbox(self.segmenter.predict(image), self.margin)
        if r1 - r0 < MIN_CROP_FRACTION * rows or c1 - c0 < MIN_CROP_FRACTION * cols:
            return 0, rows, 0, cols
        return r0, r1, c0, c1

    def describe(self) -> LungCropSpec:
        """The spec.json block that pins this crop (model name, version, weights, margin)."""
        spec = self.segmenter.spec
        return LungCropSpec(model=spec.name, version=spec.version,
                            weights_sha256=spec.weights_sha256, margin=self.margin,
                            min_crop_fraction=MIN_CROP_FRACTION)


def preprocess(image: np.ndarray, size: int = INPUT_SIZE, crop: LungCrop | None = None
               ) -> tuple[np.ndarray, Box]:
    """THE preprocessing of training and node: optional lung crop, then `prepare`.

    Returns the uint8 (size, size) network image and the box it was cut from, which the
    heatmap is pasted back into. The crop comes before the percentiles, so the intensity
    window is set by the chest, not by black borders or burnt-in text.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {image.shape}")
    box = crop.box(image) if crop is not None else (0, image.shape[0], 0, image.shape[1])
    r0, r1, c0, c1 = box
    return prepare(image[r0:r1, c0:c1], size), box


def to_network_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, S, S) or float [0, 1] (N, 1, S, S) -> float (N, 3, S, S) in [-1, 1].

    EfficientNet-Lite was trained on RGB scaled by (x - 127) / 128, so grey goes to 3 channels.
    """
    if images.dtype == torch.uint8:
        images = images.float().div(255)[:, None]
    return (images * 2 - 1).expand(-1, 3, -1, -1)


class CxrNet(nn.Module):
    """EfficientNet-Lite0 trunk with a 3-class head and a frontal/lateral head on one feature.

    One output tensor (3 class logits, then the lateral logit) keeps GradCAM and export simple.
    """

    def __init__(self, backbone: EfficientNet, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        # a named point on the final (post-activation) feature map for GradCAM's hooks: the
        # backbone's own activation module is shared with the stem, so it cannot be hooked
        self.cam_point = nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classes = nn.Linear(FEATURES, len(CLASS_KEYS))
        self.view = nn.Linear(FEATURES, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (N, 1280), also what the source probe reads."""
        return self.cam_point(self.backbone.extract_features(x)).mean(dim=(2, 3))

    def heads(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features -> 3 class logits then the lateral logit."""
        return torch.cat([self.classes(pooled), self.view(pooled)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.dropout(self.features(x)))


def build_network(size: int = INPUT_SIZE, imagenet_weights: Path | None = None) -> CxrNet:
    """The architecture; ImageNet weights only when training starts from them."""
    if imagenet_weights is None:
        backbone = EfficientNet.from_name(BACKBONE, image_size=size)
    else:
        backbone = EfficientNet.from_pretrained(
            BACKBONE, weights_path=str(imagenet_weights), image_size=size
        )
    backbone._fc = nn.Identity()  # the ImageNet classifier is never used; keeps weights small
    return CxrNet(backbone)


def unit_range(cam: torch.Tensor) -> torch.Tensor:
    """Min-max each map to [0, 1], hottest = 1.

    MONAI's default GradCAM post-processing maps (min, max) to (1, 0) on purpose, which would
    paint the least relevant region hottest on the overlay.
    """
    cam = cam.detach()
    flat = cam.flatten(1)
    low = flat.min(1).values.view(-1, *[1] * (cam.dim() - 1))
    span = (flat.max(1).values.view_as(low) - low).clamp_min(1e-8)
    return (cam - low) / span


def decide(probabilities: Mapping[str, float], covid_threshold: float) -> str:
    """THE decision rule of the shipped model, used by the node and by `training evaluate`.

    COVID-19 when the calibrated p(COVID-19) reaches the threshold picked on adult validation
    patients (spec.json `thresholds.covid`); otherwise the more probable of normal and
    pneumonia_other. Not the argmax: a film can be called COVID-19 while another class is
    more probable, and then the heatmap must explain COVID-19.
    """
    if probabilities["covid"] >= covid_threshold:
        return "covid"
    others = {k: p for k, p in probabilities.items() if k != "covid"}
    return max(others, key=others.__getitem__)


@dataclass
class CxrPrediction:
    """Calibrated class probabilities, the called class, the view decision and a heatmap over
    the input image that explains the called class."""

    probabilities: dict[str, float]
    called: str
    view: str
    view_probability: float
    heatmap: np.ndarray


class CxrClassifier:
    """Loads a model folder (hash-checked spec + weights) and classifies one radiograph."""

    def __init__(self, spec: CxrClassifierSpec, network: CxrNet, crop: LungCrop | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.network = network.eval().to(self.device)
        self.crop = crop
        self.size = spec.input.size
        self.temperature = spec.temperature
        self.covid_threshold = spec.thresholds.covid
        self.view_threshold = spec.thresholds.lateral
        self.cam = GradCAM(nn_module=self.network, target_layers=CAM_LAYER,
                           postprocessing=unit_range)

    @classmethod
    def load(cls, model_dir: Path, device: str | torch.device = "cpu") -> CxrClassifier:
        """The model folder's network on `device` ("auto": CUDA when available); the lung
        crop's model, if the spec names one, on the same device."""
        spec = load_spec(Path(model_dir), CxrClassifierSpec)
        network = build_network(spec.input.size)
        state = torch.load(Path(model_dir) / spec.weights, map_location="cpu", weights_only=True)
        network.load_state_dict({k: v.float() for k, v in state.items()})
        crop = (LungCrop.from_spec(spec.lung_crop, Path(model_dir), device)
                if spec.lung_crop is not None else None)
        return cls(spec, network, crop, device)

    def predict(self, image: np.ndarray) -> CxrPrediction:
        """image: float32 (rows, cols) in [0, 1], displayed orientation (bones white).

        The heatmap is in the original image's rows and columns; with a lung crop it covers
        the crop and is zero outside it (the network never saw the rest).
        """
        prepared, (r0, r1, c0, c1) = preprocess(image, self.size, self.crop)
        x = to_network_input(torch.from_numpy(prepared)[None]).to(self.device)
        with torch.no_grad():
            logits = self.network(x)[0].float().cpu()
        probs = torch.softmax(logits[: len(CLASS_KEYS)] / self.temperature, dim=0)
        probabilities = {k: float(p) for k, p in zip(CLASS_KEYS, probs, strict=True)}
        lateral = float(torch.sigmoid(logits[len(CLASS_KEYS)]))
        is_lateral = lateral >= self.view_threshold
        called = decide(probabilities, self.covid_threshold)
        return CxrPrediction(
            probabilities=probabilities,
            called=called,
            view=VIEW_KEYS[1] if is_lateral else VIEW_KEYS[0],
            view_probability=lateral if is_lateral else 1.0 - lateral,
            heatmap=self._heatmap(x, (r0, r1, c0, c1), image.shape, called),
        )

    def explain(self, image: np.ndarray, class_key: str) -> np.ndarray:
        """GradCAM of `class_key` on `image`, in the image's rows and columns (what `predict`
        draws for the called class; evaluation asks for other classes too)."""
        prepared, box = preprocess(image, self.size, self.crop)
        x = to_network_input(torch.from_numpy(prepared)[None]).to(self.device)
        return self._heatmap(x, box, image.shape, class_key)

    def _heatmap(self, x: torch.Tensor, box: Box, shape: tuple[int, ...], class_key: str
                 ) -> np.ndarray:
        """GradCAM of one class on the model's device, min-max scaled, pasted into the box."""
        r0, r1, c0, c1 = box
        cam = self.cam(x, class_idx=CLASS_KEYS.index(class_key)).float().cpu()  # (1, 1, S, S)
        heatmap = torch.zeros(shape, dtype=torch.float32)
        heatmap[r0:r1, c0:c1] = F.interpolate(
            cam, size=(r1 - r0, c1 - c0), mode="bilinear", align_corners=False,
        )[0, 0].clamp(0, 1)
        return heatmap.numpy().astype(np.float32)
