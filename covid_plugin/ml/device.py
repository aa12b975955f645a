"""Where models run: the `device` setting, shared by every model the node and training load."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto" is CUDA when torch sees a GPU, else the CPU; anything else as torch names it."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
