"""Datasets as tensors on the training device, batches as slices of a seeded permutation.

Files are read (and downloaded where possible) through torchvision into the data
root, decoded once per process to uint8 tensors, then moved to the device and
normalized once. Training batches are slices of a seeded `randperm`; augmentation
runs on whole batches on the device. There is no per-sample Python and no DataLoader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from normbench.errors import DataError
from normbench.registry import Registry

DATASETS: Registry = Registry("dataset")


@dataclass(frozen=True)
class RawData:
    """Decoded dataset on the CPU: images (N, C, H, W) uint8, labels (N,) int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    flip: bool  # whether horizontal flips are a valid augmentation


@dataclass(frozen=True)
class Data:
    """A dataset ready to train on: normalized float images and labels, on the device."""

    train_x: torch.Tensor  # (N, C, H, W) float32
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: bool
    flip: bool

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])


def data_root(root: str | None) -> Path:
    """data.root, else $NORMBENCH_DATA_DIR, else a per-user cache directory."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("NORMBENCH_DATA_DIR"):
        return Path(os.environ["NORMBENCH_DATA_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "normbench" / "data"


def _torchvision(cls, root: Path, where: str) -> tuple:
    """Load both splits with torchvision, downloading and verifying if the files are missing."""
    try:
        return cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except Exception as e:  # torchvision raises RuntimeError, URLError or OSError when offline
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{cls.__name__} files not found or not valid under {root / where}, and the download "
                        f"failed ({reason}). Put the official files there, or point data.root "
                        f"(or NORMBENCH_DATA_DIR) at a folder that holds them.") from e


def _idx_dataset(cls, root: Path) -> RawData:
    train, test = _torchvision(cls, root, f"{cls.__name__}/raw")
    return RawData(train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long(),
                   num_classes=len(train.classes), flip=False)


def _cifar(cls, root: Path) -> RawData:
    train, test = _torchvision(cls, root, cls.base_folder)

    def images(ds):  # (N, H, W, C) numpy -> (N, C, H, W) tensor
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()

    return RawData(images(train), torch.tensor(train.targets), images(test), torch.tensor(test.targets),
                   num_classes=len(train.classes), flip=True)


@DATASETS.register("mnist")
def mnist(cfg) -> RawData:
    """MNIST handwritten digits: 28x28 grey, 10 classes, 60k/10k."""
    from torchvision.datasets import MNIST

    return _idx_dataset(MNIST, data_root(cfg.root))


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg) -> RawData:
    """Fashion-MNIST clothing images: 28x28 grey, 10 classes, 60k/10k."""
    from torchvision.datasets import FashionMNIST

    return _idx_dataset(FashionMNIST, data_root(cfg.root))


@DATASETS.register("cifar10")
def cifar10(cfg) -> RawData:
    """CIFAR-10: 32x32 colour, 10 classes, 50k/10k."""
    from torchvision.datasets import CIFAR10

    return _cifar(CIFAR10, data_root(cfg.root))


@DATASETS.register("cifar100")
def cifar100(cfg) -> RawData:
    """CIFAR-100: 32x32 colour, 100 classes, 50k/10k."""
    from torchvision.datasets import CIFAR100

    return _cifar(CIFAR100, data_root(cfg.root))


@DATASETS.register("synthetic")
def synthetic(cfg) -> RawData:
    """Synthetic images made by code: one smooth prototype per class plus noise. No files."""
    g = torch.Generator().manual_seed(cfg.data_seed)
    c, h, w = cfg.shape
    coarse = torch.rand(cfg.num_classes, c, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * 255  # (K, C, H, W)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % cfg.num_classes
        y = y[torch.randperm(n, generator=g)]
        x = protos[y] + cfg.noise * 255 * torch.randn(n, c, h, w, generator=g)
        return x.clamp(0, 255).to(torch.uint8), y

    train_x, train_y = split(cfg.num_train)
    test_x, test_y = split(cfg.num_test)
    return RawData(train_x, train_y, test_x, test_y, cfg.num_classes, flip=False)


_DECODED: dict[str, RawData] = {}


def decoded(cfg) -> RawData:
    """The decoded uint8 dataset, read from disk once per process and dataset settings."""
    key = repr(sorted((k, v) for k, v in vars(cfg).items() if k not in ("train_size", "test_size", "augment")))
    if key not in _DECODED:
        if len(_DECODED) >= 2:  # a sweep uses one or two datasets; keep memory bounded
            _DECODED.pop(next(iter(_DECODED)))
        _DECODED[key] = DATASETS.get(cfg.name)(cfg)
    return _DECODED[key]


def balanced_subset(y: torch.Tensor, n: int | None, num_classes: int) -> torch.Tensor | None:
    """Indices of a deterministic, class-balanced subset of `n` samples (None: keep all)."""
    if n is None or n >= len(y):
        return None
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    per_class = [n // num_classes + (c < n % num_classes) for c in range(num_classes)]
    picked = [perm[y[perm] == c][:k] for c, k in enumerate(per_class)]
    return torch.cat(picked).sort().values


def load_data(cfg, device: torch.device) -> Data:
    """Decode (cached), subset, move to `device` and normalize with the training set's channel stats."""
    raw = decoded(cfg)

    def pick(x, y, n):
        idx = balanced_subset(y, n, raw.num_classes)
        return (x, y) if idx is None else (x[idx], y[idx])

    train_x, train_y = pick(raw.train_x, raw.train_y, cfg.train_size)
    test_x, test_y = pick(raw.test_x, raw.test_y, cfg.test_size)
    train_x = train_x.to(device).float().div_(255)
    test_x = test_x.to(device).float().div_(255)
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return Data((train_x - mean) / std, train_y.to(device), (test_x - mean) / std, test_y.to(device),
                raw.num_classes, cfg.augment, raw.flip)


def augment_batch(x: torch.Tensor, flip: bool, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding `pad` (+ horizontal flip), per sample, on the whole batch."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (N, C, H+2p, W+2p); zero is the mean after normalizing
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=generator.device)
    rows = (dy + torch.arange(h, device=x.device)).to(x.device)  # (N, H)
    cols = (dx + torch.arange(w, device=x.device)).to(x.device)  # (N, W)
    if flip:
        mirrored = torch.rand(n, 1, generator=generator, device=generator.device).to(x.device) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def epoch_order(data: Data, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """This epoch's sample order: a seeded permutation (drawn on the CPU, so the same on every device),
    cut to whole batches: the last incomplete batch is dropped."""
    n = len(data.train_y)
    return torch.randperm(n, generator=generator)[: n - n % batch_size].to(data.train_x.device)


def get_batch(data: Data, idx: torch.Tensor, aug_generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = data.train_x[idx]
    if data.augment:
        x = augment_batch(x, data.flip, aug_generator)
    return x, data.train_y[idx]


def train_batches(data: Data, batch_size: int, generator: torch.Generator,
                  aug_generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of training batches; the last incomplete batch is dropped."""
    order = epoch_order(data, batch_size, generator)
    for start in range(0, len(order), batch_size):
        yield get_batch(data, order[start: start + batch_size], aug_generator)
