"""The model spec (models/<name>/spec.json): the node's only knowledge of a model.

The node refuses to load weights whose sha256 differs from the spec, so a model folder that
was edited by hand, half-copied or mixed with another version fails loudly at start-up.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from covid_plugin.findings import Code, ModelInfo


class LabelSpec(BaseModel):
    """One output label and the concept it stands for."""

    key: str
    value: str
    scheme: str
    meaning: str

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class ModelSpec(BaseModel):
    """Fields every model has; model-specific settings live in `intensity`, `input`, `extra`."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    task: str
    weights: str | None = None  # file name inside the model folder; None for rule-based models
    weights_sha256: str | None = None
    labels: list[LabelSpec]
    input: dict[str, Any] = {}
    intensity: dict[str, Any] = {}
    spacing: list[float] | None = None
    thresholds: dict[str, float] = {}

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.version, self.weights_sha256 or "rule-based")

    def label(self, key: str) -> LabelSpec:
        return next(lbl for lbl in self.labels if lbl.key == key)


class ModelIntegrityError(RuntimeError):
    """Raised when weights on disk do not match the sha256 their spec names."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_spec(model_dir: Path) -> ModelSpec:
    """Read spec.json and, if the model has weights, check their hash before anyone loads them."""
    spec = ModelSpec.model_validate_json((model_dir / "spec.json").read_text())
    if spec.weights is not None:
        weights = model_dir / spec.weights
        if not weights.is_file():
            raise ModelIntegrityError(f"{spec.name}: weights file {weights} is missing")
        actual = sha256_of(weights)
        if actual != spec.weights_sha256:
            raise ModelIntegrityError(
                f"{spec.name}: weights {weights.name} sha256 {actual} does not match "
                f"spec.json {spec.weights_sha256}; refusing to load"
            )
    return spec
