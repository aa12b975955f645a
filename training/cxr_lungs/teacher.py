"""The cheXwhatsApp lung U-Net (MIT), the teacher that `training.cxr_lungs` distils.

Why this module exists: the teacher ships as a whole pickled nn.Module in torch's legacy
(pre-zip) format, not as a state dict. Unpickling it normally (plain `torch.load`, or
`pickle.load`) would import and run whatever callables the pickle names, so it is never given to
either. It is read here with `AllowListUnpickler`, which resolves only the torch/collections/
network names listed in `_ALLOWED` to inert local stand-ins; the tensors are then copied into
`TeacherUNet`, our own rebuild of its network class, after the file's sha256 has been checked.
The teacher's masks are cached as PNGs by image sha256, so it runs once per film.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from covid_plugin.ml.spec import ModelIntegrityError, sha256_of
from training.cxr_lungs.data import Item, read_grey

TEACHER_SHA256 = "9e073074b44a605f360b65ec5735dec024b471f28a5e1343638ccfcf7893e906"
TEACHER_FILE = Path("cache/chexwhatsapp/cheXwhatsApp-0.1.5/cheXwhatsApp/lung_segmentation.pt")
# cheXwhatsApp itself resizes to 512x512; 384 costs half the CPU (1.5 s instead of 3 s an image
# on one thread) and agrees with 512 at Dice 0.96 (16 held-out films), so masks are made at 384.
TEACHER_SIZE = 384
MASK_CACHE = Path(f"cache/cxr-lung/teacher{TEACHER_SIZE}")


# --------------------------------------------------------------------------- teacher loading


@dataclass
class _ModuleRecord:
    """Inert stand-in for a pickled nn.Module: keeps its __dict__, runs none of its code."""

    state: dict[str, Any] = field(default_factory=dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _TensorRef:
    """A tensor whose bytes follow the pickle in the legacy format, so it is built afterwards."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(
    storage: _StorageRef, offset: int, size: tuple, stride: tuple, *_: Any
) -> _TensorRef:
    return _TensorRef(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: _TensorRef, *_: Any) -> _TensorRef:
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "FloatStorage"): torch.float32,
    ("torch", "LongStorage"): torch.int64,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.nn.modules.conv", "Conv2d"): _ModuleRecord,
    ("torch.nn.modules.batchnorm", "BatchNorm2d"): _ModuleRecord,
    ("lung_segmentation", "PretrainedUNet"): _ModuleRecord,
    ("lung_segmentation", "Block"): _ModuleRecord,
}


class AllowListUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the names in `_ALLOWED`, each to a harmless local object."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0]
        if kind == "module":  # (kind, class, source file, source): the source is ignored
            return pid[1]
        if kind == "storage":  # (kind, dtype, key, location, numel, view)
            if pid[5] is not None:
                raise pickle.UnpicklingError("storage views are not expected in the teacher")
            return _StorageRef(str(pid[2]), pid[1])
        raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")


def _tensors(record: _ModuleRecord, prefix: str = "") -> dict[str, _TensorRef]:
    out: dict[str, _TensorRef] = {}
    for group in ("_parameters", "_buffers"):
        for name, ref in record.state.get(group, {}).items():
            if ref is not None:
                out[prefix + name] = ref
    for name, child in record.state.get("_modules", {}).items():
        out.update(_tensors(child, f"{prefix}{name}."))
    return out


def read_teacher_state_dict(fh: BinaryIO) -> dict[str, torch.Tensor]:
    """Read the teacher's tensors from torch's legacy format without executing the pickle."""
    header = [AllowListUnpickler(fh).load() for _ in range(3)]  # magic, protocol, sys info
    if header[1] != 1001 or not header[2].get("little_endian"):
        raise pickle.UnpicklingError(f"unexpected legacy torch header {header[1:]}")
    root = AllowListUnpickler(fh).load()
    if not isinstance(root, _ModuleRecord):
        raise pickle.UnpicklingError("the teacher pickle does not hold a module")
    storages: dict[str, torch.Tensor] = {}
    for key in AllowListUnpickler(fh).load():
        ref_dtype = next(
            r.storage.dtype for r in _tensors(root).values() if r.storage.key == str(key)
        )
        (numel,) = struct.unpack("<q", fh.read(8))
        raw = bytearray(fh.read(numel * torch.tensor([], dtype=ref_dtype).element_size()))
        storages[str(key)] = torch.frombuffer(raw, dtype=ref_dtype)
    return {
        name: storages[ref.storage.key].as_strided(ref.size, ref.stride, ref.offset).clone()
        for name, ref in _tensors(root).items()
    }


class _Block(nn.Module):
    """cheXwhatsApp's decoder block as shipped (batch_norm=True): (conv-bn-relu) x 2."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TeacherUNet(nn.Module):
    """Rebuild of cheXwhatsApp's `PretrainedUNet` (VGG11 encoder) with the same parameter names.

    Input: (N, 1, 512, 512), grey values in [0, 1] minus 0.5; output: 2 logits (background, lung).
    The shipped model has batch_norm=True and upscale_mode="bilinear".
    """

    def __init__(self) -> None:
        super().__init__()
        self.init_conv = nn.Conv2d(1, 3, 1)
        vgg11 = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512)]
        names = ["conv1", "conv2", "conv3", "conv3s", "conv4", "conv4s", "conv5", "conv5s"]
        for name, (c_in, c_out) in zip(names, [*vgg11, (512, 512)], strict=True):
            setattr(self, name, nn.Conv2d(c_in, c_out, 3, padding=1))
        self.center = _Block(512, 512, 256)
        self.dec5 = _Block(512 + 256, 512, 256)
        self.dec4 = _Block(512 + 256, 512, 128)
        self.dec3 = _Block(256 + 128, 256, 64)
        self.dec2 = _Block(128 + 64, 128, 32)
        self.dec1 = _Block(64 + 32, 64, 32)
        self.out = nn.Conv2d(32, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def up(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, size=like.shape[-2:], mode="bilinear")

        enc1 = F.relu(self.conv1(F.relu(self.init_conv(x))))
        enc2 = F.relu(self.conv2(F.max_pool2d(enc1, 2)))
        enc3 = F.relu(self.conv3s(F.relu(self.conv3(F.max_pool2d(enc2, 2)))))
        enc4 = F.relu(self.conv4s(F.relu(self.conv4(F.max_pool2d(enc3, 2)))))
        enc5 = F.relu(self.conv5s(F.relu(self.conv5(F.max_pool2d(enc4, 2)))))
        center = self.center(F.max_pool2d(enc5, 2))
        dec5 = self.dec5(torch.cat([up(center, enc5), enc5], 1))
        dec4 = self.dec4(torch.cat([up(dec5, enc4), enc4], 1))
        dec3 = self.dec3(torch.cat([up(dec4, enc3), enc3], 1))
        dec2 = self.dec2(torch.cat([up(dec3, enc2), enc2], 1))
        dec1 = self.dec1(torch.cat([up(dec2, enc1), enc1], 1))
        return self.out(dec1)


def load_teacher(path: Path) -> TeacherUNet:
    """The teacher, after checking that the file is the one whose licence and hash we recorded."""
    raw = path.read_bytes()
    if sha256_of(path) != TEACHER_SHA256:
        raise ModelIntegrityError(f"{path} is not the cheXwhatsApp 0.1.5 lung U-Net")
    model = TeacherUNet()
    model.load_state_dict(read_teacher_state_dict(io.BytesIO(raw)), strict=True)
    return model.eval()


# --------------------------------------------------------------------------- teacher masks


def teacher_probability(teacher: TeacherUNet, image: np.ndarray) -> np.ndarray:
    """The teacher's lung probability at the image's own size (squashed to a square, as it was)."""
    x = torch.from_numpy(image)[None, None]
    x = F.interpolate(x, size=(TEACHER_SIZE, TEACHER_SIZE), mode="bilinear", antialias=True)
    with torch.no_grad():
        prob = torch.softmax(teacher(x - 0.5), dim=1)[:, 1:]
    return F.interpolate(prob, size=image.shape, mode="bilinear")[0, 0].numpy()


def mask_path(item: Item) -> Path:
    return MASK_CACHE / f"{item.sha256}.png"


def cache_teacher_masks(data: Path, items: list[Item]) -> None:
    """Run the teacher once per image; its probability is cached as an 8-bit PNG by sha256."""
    todo = [it for it in items if not mask_path(it).is_file()]
    if not todo:
        return
    teacher = load_teacher(TEACHER_FILE)
    MASK_CACHE.mkdir(parents=True, exist_ok=True)
    for item in tqdm(todo, desc="teacher masks", mininterval=10):
        prob = teacher_probability(teacher, read_grey(data / item.path))
        tmp = mask_path(item).with_suffix(".tmp.png")
        Image.fromarray(np.round(prob * 255).astype(np.uint8)).save(tmp)
        tmp.replace(mask_path(item))
