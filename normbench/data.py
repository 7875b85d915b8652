"""Datasets as tensors on the training device, batches as slices of a seeded permutation.

Files are read (and downloaded where possible) through torchvision into the data
root, decoded once per process to uint8 tensors, then moved to the device and
normalized once. Training batches are slices of a seeded `randperm`; augmentation
runs on whole batches on the device. There is no per-sample Python and no DataLoader.

Non-iid batches (``data.batch_classes=k``, the setting Batch Renormalization was made
for, Ioffe 2017) are formed afresh every epoch from the same epoch generator
(`class_batches`): each class's samples are shuffled and cut into chunks of B/k;
the chunks, listed class by class in a shuffled class order, are dealt into k
lanes of equal length (consecutive stretches of that list); each lane is shuffled, and
batch j joins the j-th chunk of every lane. A batch therefore holds B/k samples from
each of at most k classes (exactly k, unless a class that spans two lanes meets
itself). No sample appears twice in an epoch; left out are each class's last
(size mod B/k) samples and the last (chunks mod k) chunks, different samples
every epoch. k = number of classes with B/k samples per class gives stratified,
class-balanced batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from normbench.errors import DataError, UserError
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
    batch_classes: int | None = None  # each training batch from this many classes; None: iid batches

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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(folder: Path, expected: dict[str, str | None], root: Path) -> None:
    """Refuse files whose checksum does not match: the official md5 where torchvision lists one,
    and the SHA-256 of a SHA256SUMS list kept in the data root or beside the files."""
    from torchvision.datasets.utils import check_integrity

    for name, md5 in expected.items():
        if md5 and not check_integrity(str(folder / name), md5):
            raise DataError(f"{folder / name} does not match its official checksum: the file is corrupt or "
                            "truncated. Delete it and download it again.")
    for sums in (root / "SHA256SUMS", folder / "SHA256SUMS"):
        if not sums.is_file():
            continue
        for line in sums.read_text().splitlines():
            digest, _, name = line.strip().partition("  ")
            if name in expected and _sha256(folder / name) != digest:
                raise DataError(f"{folder / name} does not match its checksum in {sums}: the file is corrupt "
                                "or truncated. Replace it.")


def _torchvision(cls, root: Path, folder: Path, expected: dict[str, str | None]) -> tuple:
    """Both splits through torchvision: verified when present, downloaded (and verified) when not."""
    if all((folder / name).is_file() for name in expected):
        verify_checksums(folder, expected, root)
        try:
            return cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
        except Exception as e:  # noqa: BLE001 - torchvision raises many kinds on a damaged file
            raise DataError(f"{cls.__name__} files under {folder} cannot be read ({_first_line(e)}): "
                            "they are corrupt or truncated. Replace them.") from e
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # to remove again if it fails
    before = set(folder.iterdir()) if folder.is_dir() else set()
    said = io.StringIO()  # torchvision prints each mirror's failure: kept for the reason, not shown
    try:
        with contextlib.redirect_stdout(said):
            return cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except Exception as e:  # noqa: BLE001 - offline: RuntimeError, URLError or OSError
        _remove_new(folder, before, created)
        raise DataError(f"{cls.__name__} files not found under {folder}, and the download failed "
                        f"({_download_reason(e, said.getvalue())}). Put the official files there, or point "
                        "data.root (or NORMBENCH_DATA_DIR) at a folder that holds them.") from e


def _remove_new(folder: Path, before: set[Path], created: list[Path]) -> None:
    """After a failed download: the partial files it left in `folder`, and the folders it created if empty."""
    if folder.is_dir():
        for path in set(folder.iterdir()) - before:
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
    for path in created:  # deepest first
        with contextlib.suppress(OSError):  # not empty (someone else's files): left alone
            path.rmdir()


def _download_reason(e: Exception, printed: str) -> str:
    """Why a download failed, in one line: the exception's first line, and where that only says
    "Error downloading FILE:", the last mirror's error (in the rest of the message, or printed)."""
    reason = _first_line(e)
    if reason.rstrip().endswith(":") or reason == type(e).__name__:
        failures = [line.strip() for line in (str(e) + "\n" + printed).splitlines()[1:] if line.strip()
                    and not line.startswith(("Downloading", "Failed to download", "Tried ", "Error downloading"))]
        if failures:
            reason = f"{reason.rstrip(': ')}: {failures[-1]}"
    return reason


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _idx_dataset(cls, root: Path) -> RawData:
    folder = root / cls.__name__ / "raw"
    expected = {Path(url).stem: None for url, _ in cls.resources}  # the uncompressed idx files
    train, test = _torchvision(cls, root, folder, expected)
    return RawData(train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long(),
                   num_classes=len(train.classes), flip=False)


def _cifar(cls, root: Path) -> RawData:
    expected = dict(cls.train_list + cls.test_list + [(cls.meta["filename"], cls.meta["md5"])])
    train, test = _torchvision(cls, root, root / cls.base_folder, expected)

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
_FAILED: dict[str, DataError] = {}  # planning: datasets that could not be loaded, by settings


def decoded(cfg) -> RawData:
    """The decoded uint8 dataset, read from disk once per process and dataset settings."""
    kept = ("train_size", "test_size", "augment", "batch_classes")  # applied after decoding
    key = repr(sorted((k, v) for k, v in vars(cfg).items() if k not in kept))
    if key in _FAILED:
        raise _FAILED[key]  # planning a sweep: one download attempt per dataset, not one per job
    if key not in _DECODED:
        if len(_DECODED) >= 2:  # a sweep uses one or two datasets; keep memory bounded
            _DECODED.pop(next(iter(_DECODED)))
        try:
            _DECODED[key] = DATASETS.get(cfg.name)(cfg)
        except DataError as e:
            _FAILED[key] = e
            raise
    return _DECODED[key]


def forget_failures() -> None:
    """Try datasets that failed to load again (the user may have put the files in place since)."""
    _FAILED.clear()


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
                raw.num_classes, cfg.augment, raw.flip, cfg.batch_classes)


def augment_batch(x: torch.Tensor, flip: bool, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding `pad` (+ horizontal flip), per sample, on the whole batch."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).flatten(2)  # (N, C, Hp*Wp); zero is the mean after normalizing
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=generator.device)
    rows = (dy + torch.arange(h, device=dy.device)).to(x.device)  # (N, H)
    cols = (dx + torch.arange(w, device=dx.device)).to(x.device)  # (N, W)
    if flip:
        mirrored = torch.rand(n, 1, generator=generator, device=generator.device).to(x.device) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    index = rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]  # (N, H, W) positions in the padded image
    return padded.gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


def class_batches(y: torch.Tensor, num_classes: int, batch_size: int, k: int,
                  generator: torch.Generator) -> torch.Tensor:
    """(batches, batch_size) sample indices, each row from at most `k` classes (module docstring).

    `y` holds the labels on the CPU; every draw comes from `generator`, in a fixed order."""
    chunk = batch_size // k
    classes = torch.randperm(num_classes, generator=generator)
    chunks = []
    for c in classes.tolist():
        own = (y == c).nonzero().squeeze(1)
        own = own[torch.randperm(len(own), generator=generator)]
        chunks.append(own[: len(own) - len(own) % chunk].view(-1, chunk))  # (chunks of class c, B/k)
    chunks = torch.cat(chunks)  # (T, B/k), class by class
    per_lane = len(chunks) // k
    lanes = chunks[: per_lane * k].view(k, per_lane, chunk)
    lanes = torch.stack([lane[torch.randperm(per_lane, generator=generator)] for lane in lanes])
    return lanes.transpose(0, 1).reshape(per_lane, batch_size)  # batch j: the j-th chunk of every lane


def batches_per_epoch(data: Data, batch_size: int) -> int:
    """Training steps in one epoch: the same every epoch, since which samples are left out does not
    change how many are."""
    if data.batch_classes is None:
        return len(data.train_y) // batch_size
    k, chunk = data.batch_classes, batch_size // data.batch_classes
    steps = int((torch.bincount(data.train_y.cpu(), minlength=data.num_classes) // chunk).sum()) // k
    if steps == 0:
        raise UserError(f"data.batch_classes={k} with batch_size={batch_size} makes no batch: it needs {k} "
                        f"chunks of {chunk} samples of one class each. Use a smaller batch_size or batch_classes")
    return steps


def epoch_order(data: Data, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """This epoch's sample order: a seeded permutation (drawn on the CPU, so the same on every device),
    cut to whole batches: the last incomplete batch is dropped. With `data.batch_classes` set, the
    batches of `class_batches` one after another."""
    if data.batch_classes is not None:
        rows = class_batches(data.train_y.cpu(), data.num_classes, batch_size, data.batch_classes, generator)
        return rows.flatten().to(data.train_x.device)
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
