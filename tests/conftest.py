"""Shared fixtures and helpers for the normbench test suite.

Everything here runs on the CPU, offline and in temporary folders:

* every test gets an empty data root (``NORMBENCH_DATA_DIR``) and a cache home of its own,
  torchvision's downloads raise at once, and sockets cannot connect;
* ``normbench.data._DECODED`` (the per-process dataset cache) is cleared around each test;
* ``write_idx_dataset`` / ``write_cifar10`` / ``write_cifar100`` write tiny datasets in the
  real on-disk formats, so torchvision's own loaders read them.
"""

from __future__ import annotations

import hashlib
import pickle
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import normbench.data
from normbench.config import SCHEMAS, compose

# Small sizes per model: fast on two CPU cores, and every GroupNorm count below divides them.
SMALL_MODEL = {
    "mlp": ["model.width=32"],
    "cnn": ["model.channels=[8,16]"],
    "resnet20": ["model.width=8", "model.depth=8"],
    "rnn": ["model.hidden_size=16"],
}
SMALL_GROUPS = 4  # divides every small width above, and leaves > 1 value per group in flat/recurrent layers

# Model/norm pairs that are refused by design (docs/protocol.md §1.7: instance norm needs H x W; FRN and
# EvoNorm-S0 too; batch renorm and weight standardization are not built inside recurrent cells).
REFUSED = {("mlp", "in"), ("rnn", "in"), ("mlp", "frn"), ("rnn", "frn"), ("mlp", "evonorm_s0"),
           ("rnn", "evonorm_s0"), ("rnn", "brn"), ("rnn", "ws_gn")}

TINY_DATA = ["data=synthetic", "data.num_train=128", "data.num_test=64"]


def small_overrides(model: str, norm: str | None = None) -> list[str]:
    """Overrides for a tiny version of `model` (and `norm`, with a group count that fits)."""
    if model not in SMALL_MODEL:
        raise KeyError(f"tests/conftest.py: add small overrides for the new model {model!r} to SMALL_MODEL")
    out = [f"model={model}", *SMALL_MODEL[model]]
    if norm is not None:
        out.append(f"norm={norm}")
        schema = SCHEMAS["norm"].get(norm)
        if schema is not None and "num_groups" in schema.__dataclass_fields__:
            out.append(f"norm.num_groups={SMALL_GROUPS}")
    return out


def tiny_run_overrides(results_dir: Path, model: str = "mlp", norm: str = "bn", **extra) -> list[str]:
    """A complete tiny training run on synthetic data (8 steps of batch 16 per epoch)."""
    out = [*TINY_DATA, *small_overrides(model, norm), "epochs=1", "batch_size=16", "device=cpu",
           "eval_batch_size=64", f"results_dir={results_dir}"]
    out += [f"{k}={v}" for k, v in extra.items()]
    return out


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    path = tmp_path / "results"
    return path


@pytest.fixture
def compose_small():
    """compose() for a tiny model: compose_small('cnn', 'gn', 'seed=3')."""

    def _compose(model: str, norm: str | None = None, *extra: str):
        return compose([*TINY_DATA, *small_overrides(model, norm), *extra])

    return _compose


# ---- isolation ------------------------------------------------------------------------------------------


class DownloadBlocked(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No test may download: torchvision's download helpers raise at once, and sockets refuse to connect.

    Returns the list of URLs a download was attempted for.
    """
    import torchvision.datasets.cifar
    import torchvision.datasets.mnist
    import torchvision.datasets.utils

    attempts: list[str] = []

    def refuse(url, *args, **kwargs):
        attempts.append(url)
        raise DownloadBlocked(f"network disabled in tests: {url}")

    for module in (torchvision.datasets.utils, torchvision.datasets.mnist, torchvision.datasets.cifar):
        for fn in ("download_and_extract_archive", "download_url"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, refuse)

    def no_connect(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket, "create_connection", no_connect)

    # Never read or write the user's real data cache.
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("NORMBENCH_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    # ... except normbench's compiled C kernels, built once for the whole session (every process a test
    # starts would otherwise build them again; tests/test_kernels.py builds in folders of its own)
    shared = tmp_path_factory.getbasetemp() / "kernels"
    shared.mkdir(exist_ok=True)
    (home / "cache" / "normbench").mkdir(parents=True)
    (home / "cache" / "normbench" / "kernels").symlink_to(shared, target_is_directory=True)
    monkeypatch.delenv("NORMBENCH_DEBUG", raising=False)
    return attempts


@pytest.fixture(autouse=True)
def quiet_machine_threads(monkeypatch):
    """A run's thread count follows the machine's load (normbench.threads.busy). Tests that compare two
    runs' numbers exactly must not see it change between them when CI is busy: here the machine always
    counts as quiet, and the count follows the work alone (tests/test_threads.py tests the load rule)."""
    import normbench.threads

    monkeypatch.setattr(normbench.threads, "busy", lambda: False)


@pytest.fixture(autouse=True)
def drawn_not_saved_figures(request, monkeypatch):
    """Every figure is drawn, so a plotting or text-layout error still fails the test that makes it, but its
    PNG and SVG are written as small placeholders: rendering both takes about 0.7 s a figure, most of a
    small sweep's test time. Tests marked `real_figures` (tests/test_report.py checks the images) and
    tests that run normbench in a subprocess write the real files."""
    if request.node.get_closest_marker("real_figures"):
        return
    from normbench import results
    from normbench.results import files

    def placeholder(path_stem: Path, figure) -> list[Path]:
        figure.canvas.draw()
        paths = [path_stem.with_suffix(f".{ext}") for ext in ("png", "svg")]
        for path in paths:
            files.atomic_write(path, b"a placeholder written by tests/conftest.py")
        return paths

    monkeypatch.setattr(results, "write_figure", placeholder)
    monkeypatch.setattr(files, "write_figure", placeholder)


@pytest.fixture(autouse=True)
def clear_decoded_cache():
    normbench.data._DECODED.clear()
    yield
    normbench.data._DECODED.clear()


# ---- tiny datasets in the real file formats --------------------------------------------------------------


def random_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">iiii", 2051, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def write_idx_dataset(root: Path, folder: str = "MNIST", n_train: int = 40, n_test: int = 20,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """MNIST-format idx files under <root>/<folder>/raw/. Returns what was written."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {
        "train_x": random_images(n_train, (28, 28), seed),
        "train_y": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_x": random_images(n_test, (28, 28), seed + 1),
        "test_y": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    write_idx_images(raw / "train-images-idx3-ubyte", written["train_x"])
    write_idx_labels(raw / "train-labels-idx1-ubyte", written["train_y"])
    write_idx_images(raw / "t10k-images-idx3-ubyte", written["test_x"])
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", written["test_y"])
    return written


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pickle(path: Path, obj) -> str:
    path.write_bytes(pickle.dumps(obj))
    return _md5(path)


def write_cifar10(root: Path, monkeypatch, per_batch: int = 6, n_test: int = 8, seed: int = 0) -> dict:
    """cifar-10-batches-py/ with 5 training batches, a test batch and batches.meta, as the official pickles.

    torchvision checks each file's md5 against class attributes; they are patched to the files written.
    """
    from torchvision.datasets import CIFAR10

    folder = Path(root) / CIFAR10.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_list, xs, ys = [], [], []
    for i in range(1, 6):
        data = random_images(per_batch, (3072,), seed + i)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        name = f"data_batch_{i}"
        train_list.append([name, _pickle(folder / name, {"batch_label": name, "data": data, "labels": labels})])
        xs.append(data)
        ys += labels
    test_x = random_images(n_test, (3072,), seed + 100)
    test_y = [int(v) for v in rng.integers(0, 10, n_test)]
    test_md5 = _pickle(folder / "test_batch", {"batch_label": "test", "data": test_x, "labels": test_y})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta_md5 = _pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", test_md5]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": meta_md5})
    return {"train_x": np.concatenate(xs), "train_y": np.array(ys), "test_x": test_x, "test_y": np.array(test_y),
            "classes": names}


def write_cifar100(root: Path, monkeypatch, n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict:
    """cifar-100-python/{train,test,meta} as the official pickles (fine and coarse labels)."""
    from torchvision.datasets import CIFAR100

    folder = Path(root) / CIFAR100.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = random_images(n, (3072,), seed + len(split))
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [v // 5 for v in fine]
        md5 = _pickle(folder / split, {"filenames": [f"{split}{i}.png" for i in range(n)], "batch_label": split,
                                       "fine_labels": fine, "coarse_labels": coarse, "data": data})
        out[f"{split}_x"], out[f"{split}_y"], out[f"{split}_md5"] = data, np.array(fine), md5
    names = [f"class_{i:02d}" for i in range(100)]
    meta_md5 = _pickle(folder / "meta", {"fine_label_names": names,
                                         "coarse_label_names": [f"super_{i}" for i in range(20)]})
    monkeypatch.setattr(CIFAR100, "train_list", [["train", out["train_md5"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", out["test_md5"]]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": meta_md5})
    out["classes"] = names
    return out


def set_affine(module: torch.nn.Module, seed: int = 0) -> None:
    """Random gamma/beta, so tests also check the per-channel affine."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + (0.5 if name.endswith("weight") else -0.5))


def one_error_line(result, *phrases: str) -> str:
    """A CLI result that is a user error: exit 2, one line starting 'error:', no traceback, with `phrases`."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture(params=["c", "pytorch"])
def kernels(request, monkeypatch) -> str:
    """Run the test twice: on normbench's C kernels (normbench/kernels; skipped where they cannot be
    built, and tests/test_kernels.py requires them wherever there is a compiler) and on PyTorch's
    kernels alone, as on a machine without a C compiler."""
    from normbench.kernels import build

    if request.param == "pytorch":
        monkeypatch.setattr(build, "library", lambda: None)
    elif build.library() is None:
        pytest.skip(build.status())
    return request.param
