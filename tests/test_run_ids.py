"""Run ids of existing settings never change: a new knob or an edit to the hashing must not orphan
finished results (they are found by their run id). These ids were computed by earlier versions."""

import pytest

from normbench.config import compose, run_id

KNOWN = {
    (): "mlp-bn-b64-s0-3cae9ab4baa2",
    # the CNN of normbench 0.2 (its global-average-pooling head); the default head is now flatten, a new id
    ("model=cnn", "norm=gn", "batch_size=8", "model.head=gap"): "cnn-gn-b8-s0-4aba475252fb",
    ("model=resnet20", "data=cifar10", "norm=ln", "seed=3"): "resnet20-ln-b64-s3-44b976676c62",
    # where, settings that only say how a run is kept or shown
    ("results_dir=elsewhere", "name=other", "device=cpu", "checkpoint=false", "tensorboard=true"):
        "mlp-bn-b64-s0-3cae9ab4baa2",
}


@pytest.mark.parametrize("overrides,expected", KNOWN.items(), ids=[" ".join(k) or "defaults" for k in KNOWN])
def test_run_ids_of_existing_settings_are_stable(overrides, expected):
    assert run_id(compose(list(overrides))) == expected


def test_a_probe_that_is_on_enters_the_run_id_one_that_is_off_does_not():
    plain = run_id(compose([]))
    assert run_id(compose(["probes.landscape.lr_multiples=[0.5,1]"])) == plain  # an off probe's options
    on = run_id(compose(["probes.scales.every=10"]))
    assert on != plain and run_id(compose(["probes.scales.every=20"])) != on


def test_the_cnn_head_is_part_of_the_run():
    assert run_id(compose(["model=cnn"])) != run_id(compose(["model=cnn", "model.head=gap"]))
