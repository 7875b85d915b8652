"""Dataset loading from the real file formats, subsets, data roots, batching and augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_cifar10, write_cifar100, write_idx_dataset
from normbench.config import compose
from normbench.data import (DATASETS, Data, augment_batch, balanced_subset, data_root, decoded, load_data,
                            train_batches)
from normbench.errors import DataError, UserError

CPU = torch.device("cpu")


def cfg_for(name: str, root: Path | None, *extra: str):
    overrides = [f"data={name}", *extra]
    if root is not None:
        overrides.append(f"data.root={root}")
    return compose(overrides).data


def _check_normalized(data: Data, raw_train: torch.Tensor, raw_test: torch.Tensor) -> None:
    """Images are scaled to [0,1], then standardized per channel with the training set's statistics."""
    train = raw_train.float() / 255
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(data.train_x, (train - mean) / std)
    torch.testing.assert_close(data.test_x, (raw_test.float() / 255 - mean) / std)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64


@pytest.mark.parametrize("name,folder,seed", [("mnist", "MNIST", 0), ("fashion_mnist", "FashionMNIST", 7)])
def test_idx_datasets_round_trip(tmp_path, name, folder, seed, offline):
    written = write_idx_dataset(tmp_path, folder, n_train=40, n_test=20, seed=seed)
    cfg = cfg_for(name, tmp_path)
    raw = decoded(cfg)
    assert raw.train_x.shape == (40, 1, 28, 28) and raw.train_x.dtype == torch.uint8
    assert raw.test_x.shape == (20, 1, 28, 28)
    assert np.array_equal(raw.train_x[:, 0].numpy(), written["train_x"])
    assert np.array_equal(raw.test_x[:, 0].numpy(), written["test_x"])
    assert raw.train_y.tolist() == written["train_y"].tolist()
    assert raw.test_y.tolist() == written["test_y"].tolist()
    assert raw.num_classes == 10 and raw.flip is False
    data = load_data(cfg, CPU)
    assert data.input_shape == (1, 28, 28) and data.augment is False and data.flip is False
    _check_normalized(data, raw.train_x, raw.test_x)
    assert data.train_y.tolist() == written["train_y"].tolist()
    assert offline == []  # the files were found: no download was attempted


def test_cifar10_round_trip(tmp_path, monkeypatch, offline):
    written = write_cifar10(tmp_path, monkeypatch, per_batch=6, n_test=8)
    cfg = cfg_for("cifar10", tmp_path)
    raw = decoded(cfg)
    assert raw.train_x.shape == (30, 3, 32, 32) and raw.train_x.dtype == torch.uint8
    assert raw.test_x.shape == (8, 3, 32, 32)
    # the pickles store each image as 1024 red, then 1024 green, then 1024 blue values, row-major
    assert np.array_equal(raw.train_x.numpy(), written["train_x"].reshape(30, 3, 32, 32))
    assert np.array_equal(raw.test_x.numpy(), written["test_x"].reshape(8, 3, 32, 32))
    assert raw.train_y.tolist() == written["train_y"].tolist()
    assert raw.test_y.tolist() == written["test_y"].tolist()
    assert raw.num_classes == 10 and raw.flip is True
    data = load_data(cfg, CPU)
    assert data.input_shape == (3, 32, 32) and data.augment is True and data.flip is True
    _check_normalized(data, raw.train_x, raw.test_x)
    assert offline == []


def test_cifar100_round_trip(tmp_path, monkeypatch):
    written = write_cifar100(tmp_path, monkeypatch, n_train=30, n_test=10)
    cfg = cfg_for("cifar100", tmp_path)
    raw = decoded(cfg)
    assert raw.num_classes == 100 and raw.flip is True
    assert np.array_equal(raw.train_x.numpy(), written["train_x"].reshape(30, 3, 32, 32))
    assert np.array_equal(raw.test_x.numpy(), written["test_x"].reshape(10, 3, 32, 32))
    assert raw.train_y.tolist() == written["train_y"].tolist()  # the fine labels
    assert raw.test_y.tolist() == written["test_y"].tolist()
    _check_normalized(load_data(cfg, CPU), raw.train_x, raw.test_x)


@pytest.mark.parametrize("name,where", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
                                        ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_files_raise_data_error_naming_the_folder(tmp_path, name, where, offline):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        load_data(cfg_for(name, empty), CPU)
    msg = str(e.value)
    assert f"under {empty / where}," in msg
    assert "download failed" in msg and "data.root" in msg
    assert "\n" not in msg
    assert offline, "the loader should have tried (and failed) to download"
    assert isinstance(e.value, UserError)


def test_corrupt_cifar_file_is_a_data_error(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")  # md5 no longer matches
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_data(cfg_for("cifar10", tmp_path), CPU)


def test_every_registered_dataset_has_a_config():
    for name in DATASETS.names():
        assert compose([f"data={name}"]).data.name == name


# ---- where data lives -------------------------------------------------------------------------------------


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMBENCH_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert data_root(None) == tmp_path / "env"
    monkeypatch.delenv("NORMBENCH_DATA_DIR")
    assert data_root(None) == tmp_path / "xdg" / "normbench" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root(None) == tmp_path / "home" / ".cache" / "normbench" / "data"
    assert data_root("~/d") == tmp_path / "home" / "d"


def test_data_root_beats_environment_when_loading(tmp_path, monkeypatch):
    written = write_idx_dataset(tmp_path / "explicit", n_train=12, n_test=6, seed=1)
    other = write_idx_dataset(tmp_path / "env", n_train=14, n_test=6, seed=2)
    monkeypatch.setenv("NORMBENCH_DATA_DIR", str(tmp_path / "env"))
    assert decoded(cfg_for("mnist", tmp_path / "explicit")).train_y.tolist() == written["train_y"].tolist()
    assert decoded(cfg_for("mnist", None)).train_y.tolist() == other["train_y"].tolist()


# ---- subsets ------------------------------------------------------------------------------------------


def test_balanced_subset():
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.full((k,), c) for c, k in enumerate([30, 5, 12, 8])])[torch.randperm(55, generator=g)]
    idx = balanced_subset(y, 12, 4)
    assert torch.equal(idx, balanced_subset(y, 12, 4))  # deterministic
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == 12
    assert torch.bincount(y[idx], minlength=4).tolist() == [3, 3, 3, 3]
    idx = balanced_subset(y, 14, 4)  # the remainder goes to the first classes
    assert torch.bincount(y[idx], minlength=4).tolist() == [4, 4, 3, 3]
    assert balanced_subset(y, None, 4) is None
    assert balanced_subset(y, 55, 4) is None and balanced_subset(y, 100, 4) is None


def test_subsets_through_load_data():
    cfg = compose(["data=synthetic", "data.num_train=200", "data.num_test=100", "data.train_size=50",
                   "data.test_size=20"]).data
    data = load_data(cfg, CPU)
    assert len(data.train_y) == 50 and len(data.test_y) == 20
    assert torch.bincount(data.train_y, minlength=10).tolist() == [5] * 10
    assert torch.bincount(data.test_y, minlength=10).tolist() == [2] * 10
    again = load_data(cfg, CPU)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.train_y, data.train_y)
    raw = decoded(cfg)
    idx = balanced_subset(raw.train_y, 50, 10)
    assert torch.equal(data.train_y, raw.train_y[idx])
    _check_normalized(data, raw.train_x[idx], raw.test_x[balanced_subset(raw.test_y, 20, 10)])
    with pytest.raises(UserError, match="data.train_size must be > 0"):
        compose(["data=synthetic", "data.train_size=0"])


def test_synthetic_is_deterministic_and_balanced():
    cfg = compose(["data=synthetic", "data.num_train=100", "data.num_test=30", "data.shape=[3,8,8]"]).data
    a = DATASETS.get("synthetic")(cfg)
    b = DATASETS.get("synthetic")(cfg)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (100, 3, 8, 8) and a.train_x.dtype == torch.uint8
    assert torch.bincount(a.train_y).tolist() == [10] * 10
    other = DATASETS.get("synthetic")(compose(["data=synthetic", "data.num_train=100", "data.num_test=30",
                                               "data.shape=[3,8,8]", "data.data_seed=1"]).data)
    assert not torch.equal(a.train_x, other.train_x)


def test_decoded_cache_is_per_settings():
    small = compose(["data=synthetic", "data.num_train=20", "data.num_test=10"]).data
    assert decoded(small) is decoded(small)
    subset = compose(["data=synthetic", "data.num_train=20", "data.num_test=10", "data.train_size=10"]).data
    assert decoded(subset) is decoded(small)  # subsets share the decoded data
    bigger = compose(["data=synthetic", "data.num_train=30", "data.num_test=10"]).data
    assert len(decoded(bigger).train_y) == 30


# ---- batches --------------------------------------------------------------------------------------------


def numbered_data(n: int, augment=False, flip=False) -> Data:
    """Sample i is an image filled with the value i, with label i: order and pairing can be read back."""
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    y = torch.arange(n)
    return Data(x, y, x[:2], y[:2], num_classes=n, augment=augment, flip=flip)


def batches(data, batch_size, seed):
    return list(train_batches(data, batch_size, torch.Generator().manual_seed(seed),
                              torch.Generator().manual_seed(seed + 1)))


def test_train_batches_drop_last_and_are_seeded():
    data = numbered_data(10)
    out = batches(data, 4, seed=0)
    assert [len(y) for _, y in out] == [4, 4]  # 10 = 4 + 4 + 2: the trailing 2 are dropped
    seen = torch.cat([y for _, y in out])
    assert len(seen.unique()) == 8  # no sample twice
    for x, y in out:
        assert torch.equal(x[:, 0, 0, 0].long(), y)  # images stay paired with their labels
    same = batches(data, 4, seed=0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(out, same))
    other = batches(data, 4, seed=1)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(out, other))
    assert len(batches(data, 10, seed=0)) == 1 and batches(data, 11, seed=0) == []
    assert [len(y) for _, y in batches(numbered_data(9), 3, seed=0)] == [3, 3, 3]


def test_train_batches_augment_only_when_enabled():
    plain = batches(numbered_data(16), 8, seed=0)
    augmented = batches(numbered_data(16, augment=True), 8, seed=0)
    for (xp, yp), (xa, ya) in zip(plain, augmented):
        assert torch.equal(yp, ya) and xa.shape == xp.shape
    # a crop with pad 4 of a 4x4 image shifts in zeros somewhere in nearly every batch
    assert any((xa == 0).sum() > (xp == 0).sum() for (xp, _), (xa, _) in zip(plain, augmented))


# ---- augmentation -------------------------------------------------------------------------------------------


def known_images(n=16, c=2, h=6, w=5) -> torch.Tensor:
    return torch.arange(1, n * c * h * w + 1, dtype=torch.float32).reshape(n, c, h, w)  # all values distinct


def _find_window(out: torch.Tensor, padded: torch.Tensor, flip: bool) -> tuple[int, int, bool] | None:
    _, h, w = out.shape
    for dy in range(padded.shape[1] - h + 1):
        for dx in range(padded.shape[2] - w + 1):
            window = padded[:, dy:dy + h, dx:dx + w]
            if torch.equal(out, window):
                return dy, dx, False
            if flip and torch.equal(out, window.flip(-1)):
                return dy, dx, True
    return None


@pytest.mark.parametrize("flip", [False, True])
def test_augment_is_a_real_crop(flip):
    x = known_images()
    pad = 2
    out = augment_batch(x, flip, torch.Generator().manual_seed(0), pad=pad)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    found = [_find_window(o, p, flip) for o, p in zip(out, padded)]
    assert all(f is not None for f in found), "every output must be a window of the zero-padded input"
    assert len({(dy, dx) for dy, dx, _ in found}) > 1  # offsets differ per sample
    assert any(dy != pad or dx != pad for dy, dx, _ in found)
    assert any(f for *_, f in found) == flip  # flips only when asked
    again = augment_batch(x, flip, torch.Generator().manual_seed(0), pad=pad)
    assert torch.equal(out, again)


def test_augment_pad_zero_is_identity_or_mirror():
    x = known_images()
    assert torch.equal(augment_batch(x, False, torch.Generator().manual_seed(0), pad=0), x)
    out = augment_batch(x, True, torch.Generator().manual_seed(0), pad=0)
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(m or torch.equal(o, i) for m, o, i in zip(mirrored, out, x))
    assert 0 < sum(mirrored) < len(x)


def test_a_failed_mnist_download_says_why_in_one_line_and_leaves_no_empty_folders(tmp_path, monkeypatch, capsys):
    """torchvision tries every mirror and raises a bare "Error downloading FILE:"; the reason is the last
    mirror's error. Its progress prints stay hidden, and the folders it made are removed again."""
    import urllib.error

    import torchvision.datasets.mnist

    def unreachable(url, download_root, **kwargs):
        Path(download_root, "partial.gz").write_bytes(b"\x1f\x8b")  # what an interrupted transfer leaves
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", unreachable)
    root = tmp_path / "cache" / "data"
    with pytest.raises(DataError) as err:
        load_data(cfg_for("mnist", root), CPU)
    msg = str(err.value)
    assert "\n" not in msg and "Temporary failure in name resolution" in msg, msg
    assert "Error downloading train-images-idx3-ubyte.gz: " in msg
    assert not (tmp_path / "cache").exists()  # no empty MNIST/raw (nor data/) left behind
    assert capsys.readouterr().out == ""
