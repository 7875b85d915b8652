"""Non-iid training batches (data.batch_classes), and run ids kept by settings added later."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_DATA, tiny_run_overrides
from normbench import runner
from normbench.config import HASHED_WHEN_SET, compose, dict_hash, run_id, to_dict
from normbench.data import Data, batches_per_epoch, class_batches, epoch_order, load_data
from normbench.errors import UserError
from normbench.models import build_model
from normbench.train import fit

CPU = torch.device("cpu")


def labelled(labels: list[int], num_classes: int, k: int | None) -> Data:
    """Sample i is an image filled with the value i; its label is labels[i]."""
    n = len(labels)
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.tensor(labels)
    return Data(x, y, x[:2], y[:2], num_classes=num_classes, augment=False, flip=False, batch_classes=k)


def unbalanced(seed: int = 0) -> list[int]:
    """5 classes of 23, 17, 40, 9 and 31 samples, in a shuffled order."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([23, 17, 40, 9, 31])])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))].tolist()


def rows(data: Data, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return epoch_order(data, batch_size, generator).view(-1, batch_size)


def test_iid_order_is_todays_bit_for_bit():
    data = labelled(unbalanced(), 5, None)
    n, batch_size = len(data.train_y), 16
    ours, reference = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(3):  # epoch after epoch, from the same stream
        expected = torch.randperm(n, generator=reference)[: n - n % batch_size]
        assert torch.equal(epoch_order(data, batch_size, ours), expected)
    assert batches_per_epoch(data, batch_size) == n // batch_size


@pytest.mark.parametrize("k,batch_size", [(1, 4), (2, 4), (2, 8), (3, 6), (5, 10), (4, 4)])
def test_every_batch_from_at_most_k_classes_and_every_sample_at_most_once(k, batch_size):
    data = labelled(unbalanced(), 5, k)
    g = torch.Generator().manual_seed(0)
    chunk = batch_size // k
    per_class = torch.bincount(data.train_y, minlength=5)
    for _ in range(3):
        batches = rows(data, batch_size, g)
        labels = data.train_y[batches]  # (batches, B)
        assert len(batches) == batches_per_epoch(data, batch_size) > 0
        assert all(len(b.unique()) <= k for b in labels)
        assert len(batches.flatten().unique()) == batches.numel()  # no sample twice
        # each of its k chunks is B/k samples of one class
        assert all(len(c.unique()) == 1 for c in labels.view(-1, k, chunk).flatten(0, 1))
        left_out = len(data.train_y) - batches.numel()
        assert left_out == int((per_class % chunk).sum()) + int((per_class // chunk).sum()) % k * chunk
        assert left_out <= 5 * (chunk - 1) + (k - 1) * chunk


def test_batches_are_seeded_and_change_every_epoch():
    data = labelled(unbalanced(), 5, 2)
    a, b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    first = rows(data, 8, a)
    assert torch.equal(first, rows(data, 8, b))
    assert not torch.equal(first, rows(data, 8, a))
    assert not torch.equal(first, rows(data, 8, torch.Generator().manual_seed(1)))


def test_batches_mostly_hold_exactly_k_classes():
    data = labelled([c for c in range(10) for _ in range(40)], 10, 2)
    labels = data.train_y[rows(data, 8, torch.Generator().manual_seed(0))]
    distinct = torch.tensor([len(b.unique()) for b in labels])
    assert len(labels) == 50 and (distinct == 2).float().mean() >= 0.9  # only a class split over two lanes repeats


def test_k_equal_to_the_classes_gives_stratified_batches():
    data = labelled([c for c in range(4) for _ in range(12)], 4, 4)
    labels = data.train_y[rows(data, 8, torch.Generator().manual_seed(0))]
    assert len(labels) == 6
    for b in labels:
        assert torch.equal(torch.bincount(b, minlength=4), torch.full((4,), 2))


def test_one_class_per_batch():
    data = labelled(unbalanced(), 5, 1)
    labels = data.train_y[rows(data, 4, torch.Generator().manual_seed(0))]
    assert all(len(b.unique()) == 1 for b in labels)
    assert len(labels) == sum(n // 4 for n in [23, 17, 40, 9, 31])


def test_class_batches_draw_only_from_their_generator():
    y = torch.tensor(unbalanced())
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    first = class_batches(y, 5, 6, 3, g)
    torch.manual_seed(2)
    assert torch.equal(first, class_batches(y, 5, 6, 3, torch.Generator().manual_seed(0)))


def test_no_batch_at_all_is_refused():
    data = labelled([0, 0, 1, 1, 2, 2], 3, 2)
    with pytest.raises(UserError, match="data.batch_classes=2 with batch_size=8 makes no batch"):
        batches_per_epoch(data, 8)


@pytest.mark.parametrize("overrides,message", [
    (["data.batch_classes=0"], "data.batch_classes must be >= 1 or null, got 0"),
    (["data.batch_classes=11"], r"data.batch_classes must be in \[1, 10\] \(synthetic has 10 classes\), got 11"),
    (["data.num_classes=3", "data.batch_classes=4"], r"must be in \[1, 3\]"),
    (["data=mnist", "data.batch_classes=11"], r"must be in \[1, 10\] \(mnist has 10 classes\)"),
    (["data=cifar100", "data.batch_classes=101"], r"must be in \[1, 100\] \(cifar100 has 100 classes\)"),
    (["batch_size=10", "data.batch_classes=4"], "batch_size=10 must be a multiple of data.batch_classes=4"),
    (["data.batch_classes=two"], "data.batch_classes"),
])
def test_bad_batch_classes_are_refused_at_compose_time(overrides, message):
    with pytest.raises(UserError, match=message):
        compose(["data=synthetic", *overrides])


def test_good_batch_classes_compose():
    assert compose(["data=synthetic", "batch_size=8", "data.batch_classes=8"]).data.batch_classes == 8
    assert compose(["data=cifar100", "batch_size=100", "data.batch_classes=100"]).data.batch_classes == 100
    assert compose(["data=synthetic", "batch_size=3", "data.batch_classes=1"]).data.batch_classes == 1


def test_training_uses_the_class_batches(results_dir):
    cfg = compose([*tiny_run_overrides(results_dir, "mlp", "bn"), "data.batch_classes=2", "epochs=2"])
    data = load_data(cfg.data, CPU)
    assert data.batch_classes == 2
    net = build_model(cfg.model, data.input_shape, data.num_classes, runner.norm_factory(cfg), cfg.seed)
    result = fit(cfg, net, data)
    assert result.status == "completed"
    assert result.steps_per_epoch == batches_per_epoch(data, 16)
    assert [r.step for r in result.records] == [result.steps_per_epoch, 2 * result.steps_per_epoch]


# ---- finished runs keep their ids ------------------------------------------------------------------------


NEW_KEYS = {"data.batch_classes": "data.batch_classes=2", "eval.shifts": "eval.shifts=[noise:0.1]",
            "model.residual": "model.residual=skipinit"}


def _without(config: dict, key: str) -> dict:
    parent, leaf = key.split(".")
    return {**config, parent: {k: v for k, v in config[parent].items() if k != leaf}}


@pytest.mark.parametrize("key", NEW_KEYS)
def test_a_new_setting_left_at_its_default_keeps_the_old_run_id(key):
    assert key in HASHED_WHEN_SET
    for model in ("mlp", "resnet20"):
        config = to_dict(compose([*TINY_DATA, f"model={model}"]))
        assert dict_hash(config) == dict_hash(_without(config, key))  # as written before the setting existed


@pytest.mark.parametrize("key", NEW_KEYS)
def test_a_new_setting_changes_the_run_id_when_set(key):
    base = [*TINY_DATA, "model=resnet20", "batch_size=8"]
    assert run_id(compose(base)) != run_id(compose([*base, NEW_KEYS[key]]))
