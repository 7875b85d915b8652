"""The probes' report section and analysis: from real tiny runs' folders to markdown, figures and numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_run_overrides
from normbench import runner
from normbench.analysis import probes as ap
from normbench.config import compose
from normbench.probes.section import probes_section

PROBES_ON = ["probes.batch_stats.every=4", "probes.batch_stats.samples=128", "probes.batch_stats.sizes=[2,8,32]",
             "probes.landscape.every=4", "probes.ics.every=4", "probes.scales.every=4"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    results_dir = tmp_path_factory.mktemp("probes") / "results"
    out = []
    for norm, extra in (("bn", []), ("none", []), ("bn", ["norm.noise.mean=0.5", "norm.noise.std=0.5"])):
        for seed in (0, 1):
            cfg = compose([*tiny_run_overrides(results_dir, "mlp", norm), f"seed={seed}", *extra, *PROBES_ON])
            out.append(runner.execute(cfg).folder)
    return out


def test_section_has_every_probe_figures_and_sentences(folders, tmp_path):
    lines, paths = probes_section(folders, tmp_path)
    text = "\n".join(lines)
    for title in ("Loss landscape", "Internal covariate shift", "Batch-statistics noise", "Noisy BN against BN",
                  "Gradient and activation scale"):
        assert title in text
    assert "On mlp, bn" in text and "bn(noise.mean=0.5,noise.std=0.5) against bn" in text
    assert {p.name for p in paths} >= {"probe_landscape.png", "probe_ics.png", "probe_batch_stats.png",
                                       "probe_scales.png"}
    assert all(p.exists() and p.parent == tmp_path for p in paths)


def test_section_is_empty_without_probes(tmp_path, results_dir):
    done = runner.execute(compose(tiny_run_overrides(results_dir, "mlp", "ln")))
    assert probes_section([done.folder], tmp_path) == ([], [])


def test_over_seeds_and_compare_by_hand():
    per_run = pd.DataFrame({"run_id": list("abcd"), "model": "mlp", "norm": ["bn", "bn", "none", "none"],
                            "train_batch_size": 16, "seed": [0, 1, 0, 1], "quantity": "q", "value": [1.0, 3.0, 5.0, 9.0]})
    table = ap.over_seeds(per_run, ["norm"]).set_index("norm")
    assert table.loc["bn", "mean"] == 2.0 and table.loc["none", "mean"] == 7.0
    assert table.loc["bn", "ci95"] == pytest.approx(12.706 * 1.0, rel=1e-3)  # t(1) x sd/sqrt(2) = 12.706 x 1
    d, half, na, nb = ap.compare(per_run, "q", "mlp", "bn", "none")
    assert d == -5.0 and (na, nb) == (2, 2) and half > 5


def test_loglog_slope_recovers_the_law():
    b = np.array([2, 4, 8, 16, 32])
    assert ap.loglog_slope(b, 3 / np.sqrt(b)) == pytest.approx(-0.5)
    assert np.isnan(ap.loglog_slope([2], [1.0]))


def test_the_experiment_report_carries_the_probes_section(folders):
    from normbench import report

    experiment = folders[0].parent
    path = report.write(report.build(experiment))
    text = path.read_text()
    assert "## Probes" in text and "(probe_landscape.png)" in text
    assert (experiment / "probe_landscape.png").exists()
