"""results.read_metrics parses plain metrics.csv files itself (the report of thousands of runs reads one per
run); whatever the file holds, it gives what pandas.read_csv gives, or refuses it as pandas does."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from normbench import results

COLUMNS = ",".join(results.METRIC_COLUMNS)


def row(epoch: int, **values) -> str:
    base = {"epoch": epoch, "step": 100 * epoch, "lr": 0.1, "train_loss": 0.5, "train_acc": 80.0, "test_loss": 0.6,
            "test_acc": 79.5, "test_acc_batch_stats": "", "test_acc_precise": "", "seconds": 1.25,
            "samples_per_s": 5120.0}
    base.update(values)
    return ",".join(str(base[c]) for c in results.METRIC_COLUMNS)


QUOTED = '"0.1"'
CASES = {
    "as written": f"{COLUMNS}\n{row(1)}\n{row(2)}\n",
    "no final newline": f"{COLUMNS}\n{row(1)}",
    "numbers of every spelling": f"{COLUMNS}\n{row(1, lr='1e-3', train_loss='nan', test_loss='inf', seconds='-0.5')}\n"
                                 f"{row(2, lr='.5', train_loss='-inf', test_loss='2', seconds='3.')}\n",
    "an integer column turned float": f"{COLUMNS}\n{row(1)}\n{row(2, step='1.5')}\n",
    "header only": f"{COLUMNS}\n",
    "a word among the numbers": f"{COLUMNS}\n{row(1, train_acc='high')}\n",
    "a row too short": f"{COLUMNS}\n{row(1)}\n1,2,3\n",
    "another header": f"{COLUMNS.replace('lr', 'rate')}\n{row(1)}\n",
    "a blank line": f"{COLUMNS}\n{row(1)}\n\n{row(2)}\n",
    "windows newlines": f"{COLUMNS}\r\n{row(1)}\r\n",
    "spaces": f"{COLUMNS}\n{row(1, lr=' 0.1')}\n",
    "quoted": f"{COLUMNS}\n{row(1, lr=QUOTED)}\n",
    "huge integer": f"{COLUMNS}\n{row(1, step='123456789012345678901234')}\n",
    "underscores": f"{COLUMNS}\n{row(1, step='1_000')}\n",
}


@pytest.mark.parametrize("name", CASES)
def test_read_metrics_gives_what_pandas_gives(tmp_path, name):
    (tmp_path / "metrics.csv").write_bytes(CASES[name].encode())
    try:
        expected = pd.read_csv(tmp_path / "metrics.csv")
    except ValueError as e:
        with pytest.raises(type(e)):
            results.read_metrics(tmp_path)
        return
    got = results.read_metrics(tmp_path)
    pd.testing.assert_frame_equal(got, expected, check_dtype=True)


def test_plain_files_take_the_quick_way():
    frame = results.runs._plain_metrics(CASES["as written"])
    assert frame is not None and list(frame.dtypes.astype(str)[:3]) == ["int64", "int64", "float64"]
    assert math.isnan(frame["test_acc_precise"][0])
    assert results.runs._plain_metrics(CASES["a word among the numbers"]) is None
